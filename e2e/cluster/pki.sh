# Certificates and kubeconfigs for a test API server: sourced by e2e/cluster/cluster.sh and
# bench/controller-api.sh. Each function works in the current directory; keys are EC P-256,
# certificates valid for 30 days.

# pki_ca CN: the certificate authority (ca.crt, ca.key) and the service-account key pair
# (sa.key, sa.pub).
pki_ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.crt -days 30 -subj "/CN=$1" 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
}

# pki_cert NAME SUBJECT EXTENSIONS: NAME.crt and NAME.key, signed by the CA; EXTENSIONS are
# openssl extension lines, `\n` between them.
pki_cert() {
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" \
    -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%b\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -out "$1.crt" -extfile "$1.ext" 2>/dev/null
}

# pki_kubeconfig NAME SERVER CLUSTER: NAME.kubeconfig, the client certificate NAME at SERVER
# (trusting the CA), its cluster and context named CLUSTER.
pki_kubeconfig() {
  cat >"$1.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: $3
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 ca.crt)
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 "$1.crt")
    client-key-data: $(base64 -w0 "$1.key")
contexts:
- name: $3
  context: {cluster: $3, user: $1}
current-context: $3
KUBECONFIG
}
