-- Argo CD health check for CohortSync and KameleoonConnection
-- (cohortsync.io). Both kinds report the conditions Ready, Reconciling and
-- Stalled in the kstatus convention; this maps them to Argo CD's statuses:
--
--   Ready with reason Suspended     -> Suspended
--   Stalled=True                    -> Degraded (a person must act)
--   Ready=False with reason Stale   -> Degraded (exports stopped succeeding)
--   Reconciling=True                -> Progressing (exporting or retrying)
--   Ready=True                      -> Healthy
--   Ready=False                     -> Degraded
--   no status for the current spec  -> Progressing
--
-- It uses only the base Lua library, which Argo CD always provides.
local health = {}

local function find_condition(conditions, condition_type)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function with_reason(condition)
  if condition.reason ~= nil and condition.reason ~= "" then
    if condition.message ~= nil and condition.message ~= "" then
      return condition.reason .. ": " .. condition.message
    end
    return condition.reason
  end
  return condition.message or ""
end

local status = obj.status
if status == nil or status.conditions == nil then
  health.status = "Progressing"
  health.message = "Waiting for the operator to report status"
  return health
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= generation then
  health.status = "Progressing"
  health.message = "Waiting for the operator to act on generation " .. generation
  return health
end

local ready = find_condition(status.conditions, "Ready")
local stalled = find_condition(status.conditions, "Stalled")
local reconciling = find_condition(status.conditions, "Reconciling")

if ready ~= nil and ready.reason == "Suspended" then
  health.status = "Suspended"
  health.message = with_reason(ready)
  return health
end
if stalled ~= nil and stalled.status == "True" then
  health.status = "Degraded"
  health.message = with_reason(stalled)
  return health
end
if ready ~= nil and ready.status == "False" and ready.reason == "Stale" then
  health.status = "Degraded"
  health.message = with_reason(ready)
  return health
end
if reconciling ~= nil and reconciling.status == "True" then
  health.status = "Progressing"
  health.message = with_reason(reconciling)
  return health
end
if ready ~= nil and ready.status == "True" then
  health.status = "Healthy"
  health.message = with_reason(ready)
  return health
end
if ready ~= nil and ready.status == "False" then
  health.status = "Degraded"
  health.message = with_reason(ready)
  return health
end

health.status = "Progressing"
health.message = "Waiting for the Ready condition"
return health
