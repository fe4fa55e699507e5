"""Exports one Mixpanel cohort to Kameleoon the way a user would script it
without the operator: page through the Engage API with `requests`, keep the
identified profiles, and post the members to the Data API.

It does the same job as one OneTime export of the operator, against the
same servers, and prints its own resource use as JSON on the last line of
standard output. Configuration comes from environment variables (see
`main`); the benchmark harness sets them.
"""

import json
import os
import resource
import secrets
import sys
import time
import urllib.parse

import requests

MAX_BODY_BYTES = 1024 * 1024
MAX_VISITOR_CODE_CHARS = 100


def engage_pages(session, base, project_id, cohort_id):
    """Yields every page of a cohort's profiles."""
    url = f"{base}/api/query/engage"
    form = {
        "filter_by_cohort": json.dumps({"id": cohort_id}),
        "include_all_users": "false",
        "output_properties": json.dumps(["$kameleoon_mapping_id"]),
    }
    page = 0
    session_id = None
    while True:
        body = dict(form)
        if page > 0:
            body["page"] = str(page)
            body["session_id"] = session_id
        response = session.post(url, params={"project_id": project_id}, data=body, timeout=60)
        response.raise_for_status()
        data = response.json()
        yield data
        if page == 0:
            session_id = data.get("session_id")
        if len(data["results"]) < data.get("page_size", 1000):
            return
        page += 1


def identifier(profile):
    """Returns the identifier Kameleoon matches, or None to skip the profile."""
    mapping = (profile.get("$properties") or {}).get("$kameleoon_mapping_id")
    if isinstance(mapping, str) and mapping.strip():
        chosen = mapping
    else:
        chosen = str(profile.get("$distinct_id"))
        if chosen.startswith("$device:"):
            return None
    if not chosen.strip() or len(chosen) > MAX_VISITOR_CODE_CHARS:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in chosen):
        return None
    return chosen


def kameleoon_token(api, client_id, client_secret):
    response = requests.post(
        f"{api}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["access_token"]


def custom_data_index(api, headers, site_code, name):
    """Finds the custom data by name, creating it when missing."""
    site_filter = json.dumps([{"field": "code", "operator": "EQUAL", "parameters": [site_code]}])
    sites = requests.get(f"{api}/sites", params={"filter": site_filter}, headers=headers, timeout=30).json()
    site_id = sites[0]["id"]
    data_filter = json.dumps([{"field": "siteId", "operator": "EQUAL", "parameters": [site_id]}])
    existing = requests.get(
        f"{api}/custom-datas", params={"filter": data_filter, "perPage": 200}, headers=headers, timeout=30
    ).json()
    for item in existing:
        if item["name"] == name:
            return item["index"]
    created = requests.post(
        f"{api}/custom-datas",
        json={"name": name, "siteId": site_id, "format": "BOOLEAN", "type": "UNIQUE", "method": "CLIENT", "scope": "VISITOR"},
        headers=headers,
        timeout=30,
    )
    created.raise_for_status()
    return created.json()["index"]


def main():
    env = os.environ
    started = time.monotonic()
    mixpanel = requests.Session()
    mixpanel.auth = (env["MIXPANEL_USERNAME"], env["MIXPANEL_SECRET"])

    # Collect every profile first, as a script usually does.
    profiles = []
    pages = 0
    for page in engage_pages(mixpanel, env["MIXPANEL_URL"], env["MIXPANEL_PROJECT"], int(env["MIXPANEL_COHORT"])):
        profiles.extend(page["results"])
        pages += 1
    members = sorted({i for i in (identifier(p) for p in profiles) if i is not None})

    api = env["KAMELEOON_API_URL"]
    token = kameleoon_token(api, env["KAMELEOON_CLIENT_ID"], env["KAMELEOON_CLIENT_SECRET"])
    headers = {"Authorization": f"Bearer {token}", "User-Agent": "cohort-export-script/1.0"}
    index = custom_data_index(api, headers, env["KAMELEOON_SITE_CODE"], env["KAMELEOON_CUSTOM_DATA"])

    values = urllib.parse.quote(json.dumps({"true": 1}, separators=(",", ":")), safe="")
    lines = [
        f"eventType=customData&index={index}&valuesCountMap={values}&overwrite=true"
        f"&nonce={secrets.token_hex(8).upper()}&visitorCode={urllib.parse.quote_plus(member)}"
        for member in members
    ]
    requests_sent = 0
    batch, size = [], 0
    events_url = f"{env['KAMELEOON_DATA_URL']}/visit/events"
    for line in lines + [None]:
        if line is None or (batch and size + len(line) + 1 > MAX_BODY_BYTES):
            if batch:
                response = requests.post(
                    events_url, params={"siteCode": env["KAMELEOON_SITE_CODE"]}, data="\n".join(batch).encode(),
                    headers=headers, timeout=60,
                )
                response.raise_for_status()
                requests_sent += 1
            batch, size = [], 0
        if line is not None:
            batch.append(line)
            size += len(line) + (1 if size else 0)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "members": len(members),
        "profiles": len(profiles),
        "mixpanel_requests": pages,
        "kameleoon_requests": requests_sent,
        "wall_seconds": time.monotonic() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    sys.exit(main())
