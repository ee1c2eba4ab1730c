// Package deploy holds no code: its directories are the systemd unit,
// container image, Kubernetes manifests, Grafana dashboard and Prometheus
// alert rules for cryptnbd (see docs/operations.md). Its tests check them
// against the real tools: systemd-analyze verify, a static build with no
// dynamic dependencies, the dashboard's queries against a real scrape, and
// promtool check rules. The Kubernetes manifests are checked by their own
// package, deploy/kubernetes, which alone pulls in k8s.io/api.
package deploy
