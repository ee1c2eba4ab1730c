// Package kubernetes holds no code: this directory is cryptnbd's
// Kubernetes manifests (kubectl apply -k). Its test decodes every manifest
// strictly into the k8s.io/api types, so a misspelt field fails, and
// checks that the pieces refer to each other correctly. It is a package of
// its own so that only it pulls in k8s.io/api.
package kubernetes
