// Command argocd-health runs an Argo CD resource health check, a Lua script,
// on one Kubernetes object (JSON or YAML) read from standard input, and
// prints the result as the JSON object {"status": "...", "message": "..."}.
//
// Usage: argocd-health SCRIPT.lua < object.(json|yaml)
//
// It sets up the script the way Argo CD's health assessment does. The object
// is the global table `obj`: maps become tables with string keys, lists
// become tables indexed from 1, and numbers become Lua numbers. Only the
// package, base and table libraries are opened (Argo CD also opens a reduced
// os library, which the scripts tested here do not use), and the script has
// one second to finish. It must return a table whose `status` is one of Argo CD's health
// codes; a status outside those codes is reported as Unknown, as Argo CD does.
// Tests use it to check the health checks in examples/gitops for real.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

// healthCodes are the statuses Argo CD accepts from a health check.
var healthCodes = map[string]bool{
	"Healthy":     true,
	"Progressing": true,
	"Degraded":    true,
	"Suspended":   true,
	"Missing":     true,
	"Unknown":     true,
}

type output struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health SCRIPT.lua < object.(json|yaml)")
		os.Exit(2)
	}
	result, err := run(os.Args[1], os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "argocd-health: %v\n", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		fmt.Fprintf(os.Stderr, "argocd-health: writing the result failed: %v\n", err)
		os.Exit(1)
	}
}

func run(scriptPath string, in io.Reader) (*output, error) {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return nil, fmt.Errorf("reading the script failed: %w", err)
	}
	data, err := io.ReadAll(in)
	if err != nil {
		return nil, fmt.Errorf("reading standard input failed: %w", err)
	}
	// JSON is valid YAML, so one conversion covers both input formats.
	jsonData, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("input is neither valid JSON nor valid YAML: %w", err)
	}
	var object map[string]interface{}
	if err := json.Unmarshal(jsonData, &object); err != nil || object == nil {
		return nil, fmt.Errorf("input is not a single Kubernetes object")
	}

	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	libraries := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	}
	for _, library := range libraries {
		call := lua.P{Fn: state.NewFunction(library.open), NRet: 0, Protect: true}
		if err := state.CallByParam(call, lua.LString(library.name)); err != nil {
			return nil, fmt.Errorf("opening the Lua library %q failed: %w", library.name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoString(string(script)); err != nil {
		return nil, fmt.Errorf("the script failed: %w", err)
	}

	returned, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return nil, fmt.Errorf("the script returned %s, not a table", state.Get(-1).Type())
	}
	result := &output{
		Status:  lua.LVAsString(returned.RawGetString("status")),
		Message: lua.LVAsString(returned.RawGetString("message")),
	}
	if !healthCodes[result.Status] {
		result.Message = fmt.Sprintf("the script returned the invalid health status %q", result.Status)
		result.Status = "Unknown"
	}
	return result, nil
}

// toLua converts a decoded JSON value into the Lua value Argo CD gives scripts.
func toLua(state *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case map[string]interface{}:
		table := state.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	case []interface{}:
		table := state.NewTable()
		for i, item := range v {
			table.RawSetInt(i+1, toLua(state, item))
		}
		return table
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}
