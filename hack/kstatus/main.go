// Command kstatus reads one Kubernetes object (JSON or YAML) on standard input
// and prints the status that sigs.k8s.io/cli-utils/pkg/kstatus/status computes
// for it, as the JSON object {"status": "...", "message": "..."}.
//
// Tests use it to check that the operator's resources report status the way
// GitOps tools (Flux, Argo CD, kpt) read it. It exits with status 1 when the
// input is not a single object or when the computation fails.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type output struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: kstatus < object.(json|yaml)")
		os.Exit(2)
	}
	result, err := compute(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: writing the result failed: %v\n", err)
		os.Exit(1)
	}
}

func compute(in io.Reader) (*output, error) {
	data, err := io.ReadAll(in)
	if err != nil {
		return nil, fmt.Errorf("reading standard input failed: %w", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, fmt.Errorf("standard input is empty: expected one Kubernetes object")
	}
	// JSON is valid YAML, so one conversion covers both input formats.
	jsonData, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("input is neither valid JSON nor valid YAML: %w", err)
	}
	// Unstructured decoding keeps whole numbers as int64, which kstatus
	// expects for fields such as metadata.generation.
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(jsonData); err != nil {
		return nil, fmt.Errorf("input is not a single Kubernetes object: %w", err)
	}
	result, err := status.Compute(obj)
	if err != nil {
		return nil, fmt.Errorf("computing the status of %s %q failed: %w", obj.GetKind(), obj.GetName(), err)
	}
	return &output{Status: result.Status.String(), Message: result.Message}, nil
}
