package kubernetes_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// serviceMonitor is the part of the Prometheus Operator's CRD used here;
// strict decoding into it catches misspelt fields of that part.
type serviceMonitor struct {
	APIVersion string         `json:"apiVersion"`
	Kind       string         `json:"kind"`
	Metadata   metav1Metadata `json:"metadata"`
	Spec       struct {
		JobLabel          string        `json:"jobLabel"`
		Selector          labelSelector `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

type metav1Metadata struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
}

type labelSelector struct {
	MatchLabels map[string]string `json:"matchLabels"`
}

type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
}

// newObject returns an empty object of the Go type for apiVersion/kind.
func newObject(apiVersion, kind string) (any, bool) {
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		return &corev1.Namespace{}, true
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1/Secret":
		return &corev1.Secret{}, true
	case "v1/Service":
		return &corev1.Service{}, true
	case "apps/v1/StatefulSet":
		return &appsv1.StatefulSet{}, true
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, true
	case "monitoring.coreos.com/v1/ServiceMonitor":
		return &serviceMonitor{}, true
	case "kustomize.config.k8s.io/v1beta1/Kustomization":
		return &kustomization{}, true
	}
	return nil, false
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decodeStrict decodes one JSON document into obj, failing on unknown
// fields (encoding/json's DisallowUnknownFields), and on fields that match
// only case-insensitively (sigs.k8s.io/json, as the API server's strict
// field validation does). Duplicate keys are caught before, by
// YAMLToJSONStrict.
func decodeStrict(doc []byte, obj any) error {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.DisallowUnknownFields()
	if err := dec.Decode(obj); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the object")
	}
	strict, err := sigsjson.UnmarshalStrict(doc, obj)
	if err != nil {
		return err
	}
	if len(strict) > 0 {
		return fmt.Errorf("%v", strict)
	}
	return nil
}

// manifests decodes every document of every YAML file here.
func manifests(t *testing.T) map[string][]any {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	out := map[string][]any{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSep.Split(string(raw), -1) {
			js, err := yaml.YAMLToJSONStrict([]byte(doc))
			if err != nil {
				t.Errorf("%s document %d: %v", f, i, err)
				continue
			}
			if string(js) == "null" { // only comments
				continue
			}
			var tm struct{ APIVersion, Kind string }
			if err := json.Unmarshal(js, &tm); err != nil {
				t.Errorf("%s document %d: %v", f, i, err)
				continue
			}
			obj, ok := newObject(tm.APIVersion, tm.Kind)
			if !ok {
				t.Errorf("%s document %d: no Go type for %s %s; add one to newObject", f, i, tm.APIVersion, tm.Kind)
				continue
			}
			if err := decodeStrict(js, obj); err != nil {
				t.Errorf("%s document %d (%s): %v", f, i, tm.Kind, err)
				continue
			}
			out[f] = append(out[f], obj)
		}
	}
	return out
}

func TestStrictDecodeCatchesTypos(t *testing.T) {
	for _, doc := range []string{
		"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selectr: {a: b}}\n",
		"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {Selector: {a: b}}\n",
		"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {type: ClusterIP, type: NodePort}\n",
		"apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec: {endpoints: [{prot: metrics}]}\n",
	} {
		js, err := yaml.YAMLToJSONStrict([]byte(doc))
		if err != nil {
			continue // a YAML-level error is also a catch
		}
		var tm struct{ APIVersion, Kind string }
		json.Unmarshal(js, &tm)
		obj, _ := newObject(tm.APIVersion, tm.Kind)
		if err := decodeStrict(js, obj); err == nil {
			t.Errorf("strict decoding accepted:\n%s", doc)
		}
	}
}

// objects returns the decoded objects of type T.
func objects[T any](all map[string][]any) []*T {
	var out []*T
	files := make([]string, 0, len(all))
	for f := range all {
		files = append(files, f)
	}
	slices.Sort(files)
	for _, f := range files {
		for _, o := range all[f] {
			if v, ok := o.(*T); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

func one[T any](t *testing.T, all map[string][]any) *T {
	t.Helper()
	objs := objects[T](all)
	if len(objs) != 1 {
		t.Fatalf("%d objects of type %T, want 1", len(objs), new(T))
	}
	return objs[0]
}

func TestManifests(t *testing.T) {
	all := manifests(t)
	if t.Failed() {
		return
	}
	sts := one[appsv1.StatefulSet](t, all)
	sa := one[corev1.ServiceAccount](t, all)
	cm := one[corev1.ConfigMap](t, all)
	pod := sts.Spec.Template
	podLabels := labels.Set(pod.Labels)

	t.Run("workload identity", func(t *testing.T) {
		if pod.Labels["azure.workload.identity/use"] != "true" {
			t.Errorf("pod template lacks label azure.workload.identity/use: \"true\"")
		}
		if pod.Spec.ServiceAccountName != sa.Name {
			t.Errorf("pod uses service account %q, want %q", pod.Spec.ServiceAccountName, sa.Name)
		}
		if !regexp.MustCompile(`^[0-9a-f-]{36}$`).MatchString(sa.Annotations["azure.workload.identity/client-id"]) {
			t.Errorf("service account has no azure.workload.identity/client-id annotation holding a GUID")
		}
	})

	t.Run("statefulset", func(t *testing.T) {
		sel, err := metav1LabelSelector(sts.Spec.Selector.MatchLabels)
		if err != nil || !sel.Matches(podLabels) {
			t.Errorf("StatefulSet selector %v does not match its pod labels %v", sts.Spec.Selector.MatchLabels, pod.Labels)
		}
		if len(pod.Spec.Containers) != 1 {
			t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
		}
		c := pod.Spec.Containers[0]
		ports := map[string]int32{}
		for _, p := range c.Ports {
			ports[p.Name] = p.ContainerPort
		}
		if ports["nbd"] != 10809 || ports["metrics"] != 9090 {
			t.Errorf("container ports %v, want nbd 10809 and metrics 9090", ports)
		}
		for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
			if p == nil || p.HTTPGet == nil {
				t.Errorf("%s probe is not an HTTP GET", name)
				continue
			}
			want := "/healthz"
			if name == "readiness" {
				want = "/readyz"
			}
			if p.HTTPGet.Path != want || p.HTTPGet.Port != intstr.FromString("metrics") {
				t.Errorf("%s probe GETs %s on %s, want %s on metrics", name, p.HTTPGet.Path, p.HTTPGet.Port.String(), want)
			}
		}
		if len(c.EnvFrom) != 1 || c.EnvFrom[0].ConfigMapRef == nil || c.EnvFrom[0].ConfigMapRef.Name != cm.Name {
			t.Errorf("container does not take its environment from ConfigMap %s", cm.Name)
		}
		dataDir := cm.Data["CRYPTNBD_DATA_DIR"]
		claims := map[string]bool{}
		for _, vct := range sts.Spec.VolumeClaimTemplates {
			claims[vct.Name] = true
		}
		volumes := map[string]bool{}
		for _, v := range pod.Spec.Volumes {
			volumes[v.Name] = true
		}
		mounted := false
		for _, m := range c.VolumeMounts {
			if !claims[m.Name] && !volumes[m.Name] {
				t.Errorf("volume mount %s refers to no volume or claim template", m.Name)
			}
			if m.MountPath == dataDir && claims[m.Name] {
				mounted = true
			}
		}
		if !mounted {
			t.Errorf("no persistent volume claim is mounted at CRYPTNBD_DATA_DIR %q", dataDir)
		}
		sc := c.SecurityContext
		if psc := pod.Spec.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
			t.Errorf("pod does not require runAsNonRoot")
		}
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("container security context is not restricted: %+v", sc)
		}
		if pod.Annotations["prometheus.io/scrape"] != "true" || pod.Annotations["prometheus.io/port"] != "9090" {
			t.Errorf("pod is not annotated for scraping on 9090: %v", pod.Annotations)
		}
		found := false
		for _, s := range objects[corev1.Service](all) {
			if s.Name == sts.Spec.ServiceName {
				found = s.Spec.ClusterIP == corev1.ClusterIPNone
			}
		}
		if !found {
			t.Errorf("serviceName %q is not a headless Service here", sts.Spec.ServiceName)
		}
	})

	t.Run("services", func(t *testing.T) {
		c := pod.Spec.Containers[0]
		named := map[string]bool{}
		for _, p := range c.Ports {
			named[p.Name] = true
		}
		var nbd, metrics bool
		for _, s := range objects[corev1.Service](all) {
			if !labels.SelectorFromSet(s.Spec.Selector).Matches(podLabels) || len(s.Spec.Selector) == 0 {
				t.Errorf("Service %s selector %v does not match the pods", s.Name, s.Spec.Selector)
			}
			for _, p := range s.Spec.Ports {
				if p.TargetPort.Type != intstr.String || !named[p.TargetPort.StrVal] {
					t.Errorf("Service %s port %s targets %s, not a named container port", s.Name, p.Name, p.TargetPort.String())
				}
				nbd = nbd || (p.Port == 10809 && s.Spec.ClusterIP != corev1.ClusterIPNone)
				if p.Port == 9090 {
					metrics = true
					if s.Annotations["prometheus.io/scrape"] != "true" {
						t.Errorf("metrics Service %s is not annotated prometheus.io/scrape", s.Name)
					}
				}
			}
		}
		if !nbd || !metrics {
			t.Errorf("want a Service for NBD (10809) and one for metrics (9090); nbd %v metrics %v", nbd, metrics)
		}
	})

	t.Run("servicemonitor", func(t *testing.T) {
		sm := one[serviceMonitor](t, all)
		matched := 0
		for _, s := range objects[corev1.Service](all) {
			if !labels.SelectorFromSet(sm.Spec.Selector.MatchLabels).Matches(labels.Set(s.Labels)) {
				continue
			}
			matched++
			for _, ep := range sm.Spec.Endpoints {
				if !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port }) {
					t.Errorf("ServiceMonitor endpoint port %q is not a port of Service %s", ep.Port, s.Name)
				}
			}
		}
		if matched != 1 {
			t.Errorf("ServiceMonitor selects %d Services, want the metrics one", matched)
		}
		if len(sm.Spec.Endpoints) == 0 || sm.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("ServiceMonitor does not scrape /metrics")
		}
	})

	t.Run("configmap", func(t *testing.T) {
		// The env file's settings are checked against serve's real flags
		// by the deploy package; the ConfigMap may only use those.
		env, err := os.ReadFile("../systemd/cryptnbd.env")
		if err != nil {
			t.Fatal(err)
		}
		for k := range cm.Data {
			if !regexp.MustCompile(`(?m)^#?` + regexp.QuoteMeta(k) + `=`).Match(env) {
				t.Errorf("ConfigMap sets %s, which deploy/systemd/cryptnbd.env does not know", k)
			}
		}
		for k, want := range map[string]string{"CRYPTNBD_LISTEN": "0.0.0.0:10809", "CRYPTNBD_METRICS_LISTEN": "0.0.0.0:9090", "CRYPTNBD_LOG_FORMAT": "json"} {
			if cm.Data[k] != want {
				t.Errorf("ConfigMap %s = %q, want %q", k, cm.Data[k], want)
			}
		}
		ca := cm.Data["CRYPTNBD_KEYVAULT_CA"]
		secret := one[corev1.Secret](t, all)
		if _, ok := secret.StringData[filepath.Base(ca)]; !ok {
			t.Errorf("CRYPTNBD_KEYVAULT_CA %s is not a key of Secret %s", ca, secret.Name)
		}
	})

	t.Run("kustomization", func(t *testing.T) {
		k := one[kustomization](t, all)
		var want []string
		for f := range all {
			if f != "kustomization.yaml" {
				want = append(want, f)
			}
		}
		slices.Sort(want)
		got := slices.Sorted(slices.Values(k.Resources))
		if !slices.Equal(got, want) {
			t.Errorf("kustomization resources %v, want every manifest %v", got, want)
		}
	})

	t.Run("namespaces", func(t *testing.T) {
		for f, objs := range all {
			for _, o := range objs {
				b, _ := json.Marshal(o)
				var m struct {
					Kind     string
					Metadata metav1Metadata
				}
				json.Unmarshal(b, &m)
				if m.Kind == "Namespace" || m.Kind == "Kustomization" || strings.HasPrefix(f, "kustomization") {
					continue
				}
				if m.Metadata.Namespace != "cryptnbd" {
					t.Errorf("%s: %s %s is in namespace %q, want cryptnbd", f, m.Kind, m.Metadata.Name, m.Metadata.Namespace)
				}
			}
		}
	})
}

func metav1LabelSelector(m map[string]string) (labels.Selector, error) {
	if len(m) == 0 {
		return nil, fmt.Errorf("empty selector")
	}
	return labels.SelectorFromSet(m), nil
}
