#!/usr/bin/env bash
# Validates the deploy files as far as this machine allows; prints one line per check and
# "skipped: <why>" for a check whose tool is missing. Exit status 1 if any check failed.
#   bash deploy/check.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deploy="$root/deploy"
failed=0
ok() { echo "ok:      $*"; }
bad() { echo "FAILED:  $*"; failed=1; }
skip() { echo "skipped: $*"; }

# 1. nats-server's own config check, with every variable the configs need.
nats="$(bash "$root/scripts/nats-server.sh" 2>/dev/null)" || nats=""
if [[ -n "$nats" ]]; then
  env_vars=(WANGGE_NATS_SERVER_NAME=nats-1)
  for name in $(grep -o 'WANGGE_NATS_PASS_[A-Z_]*' "$deploy/nats/accounts.conf" | sort -u); do
    env_vars+=("$name=check-$RANDOM")
  done
  for conf in nats/single.conf nats/cluster.conf; do
    if out="$(env "${env_vars[@]}" "$nats" -t -c "$deploy/$conf" 2>&1)"; then ok "$conf: $out"; else bad "$conf: $out"; fi
  done
  # The Kubernetes variant includes ./accounts.conf from its ConfigMap: check it beside a copy.
  tmp="$(mktemp -d)"; cp "$deploy/kubernetes/nats-cluster.conf" "$deploy/nats/accounts.conf" "$tmp/"
  if out="$(env "${env_vars[@]}" "$nats" -t -c "$tmp/nats-cluster.conf" 2>&1)"; then ok "kubernetes/nats-cluster.conf: $out"; else bad "kubernetes/nats-cluster.conf: $out"; fi
  rm -rf "$tmp"
else
  skip "nats-server -t (no nats-server: run scripts/nats-server.sh)"
fi

# 2. accounts.conf is what gen_accounts.py writes today.
if command -v python3 >/dev/null; then
  tmp="$(mktemp -d)"; cp "$deploy/nats/accounts.conf" "$tmp/before"
  python3 "$deploy/nats/gen_accounts.py" >/dev/null
  if cmp -s "$tmp/before" "$deploy/nats/accounts.conf"; then ok "accounts.conf matches gen_accounts.py"; else bad "accounts.conf differs from gen_accounts.py output (now regenerated: commit it)"; fi
  rm -rf "$tmp"
  # 3. YAML parses, with the expected objects.
  if python3 -c "import yaml" 2>/dev/null; then
    if out="$(python3 - "$deploy" <<'PY'
import sys, yaml
deploy = sys.argv[1]
compose = yaml.safe_load(open(f"{deploy}/compose/compose.yaml"))
print("compose services:", " ".join(sorted(compose["services"])))
docs = list(yaml.safe_load_all(open(f"{deploy}/kubernetes/wangge.yaml")))
print("kubernetes objects:", " ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
# A StatefulSet's pods find each other by name through its headless Service before any is
# Ready (a NATS cluster forms its routes first): the Service must publish unready addresses.
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
for d in docs:
    if d["kind"] == "StatefulSet":
        governing = services.get(d["spec"]["serviceName"])
        if governing is None or not governing["spec"].get("publishNotReadyAddresses"):
            sys.exit(f"StatefulSet/{d['metadata']['name']}: Service {d['spec']['serviceName']} must set publishNotReadyAddresses: true")
PY
)"; then ok "$(echo "$out" | tr '\n' ';')"; else bad "YAML: $out"; fi
  else
    skip "YAML parse (python3 has no yaml module)"
  fi
else
  skip "gen_accounts.py and YAML checks (no python3)"
fi

# 4. systemd units (executables are not installed here: that complaint is expected).
if command -v systemd-analyze >/dev/null; then
  tmp="$(mktemp -d)"; cp "$deploy/systemd/"* "$tmp/"
  cp "$tmp/wangge-dispatch@.service" "$tmp/wangge-dispatch@1.service"
  out="$(cd "$tmp" && systemd-analyze verify --man=no ./nats-server.service ./wangge-dispatch@1.service 2>&1 | grep -v 'is not executable')"
  if [[ -z "$out" ]]; then ok "systemd units verify (apart from binaries not installed here)"; else bad "systemd: $out"; fi
  rm -rf "$tmp"
else
  skip "systemd-analyze verify (not installed)"
fi

# 5. Schemas: Kubernetes objects against the API's own schemas (kubernetes-validate bundles
# them) and the compose file against the Compose Specification (check-jsonschema vendors it).
# Both come from PyPI into tools/deploy-check (git-ignored); set WANGGE_DEPLOY_CHECK_OFFLINE=1
# to skip installing.
venv="$root/tools/deploy-check"
if [[ ! -x "$venv/bin/kubernetes-validate" && -z "${WANGGE_DEPLOY_CHECK_OFFLINE:-}" ]] && command -v python3 >/dev/null; then
  echo "installing kubernetes-validate and check-jsonschema into $venv (PyPI)" >&2
  python3 -m venv "$venv" >&2 && "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==1.37.0" "check-jsonschema==0.39.0" >&2 || echo "install failed" >&2
fi
if [[ -x "$venv/bin/kubernetes-validate" ]]; then
  if out="$("$venv/bin/kubernetes-validate" --strict --quiet "$deploy/kubernetes/wangge.yaml" 2>&1)"; then
    ok "kubernetes/wangge.yaml: every object valid against the Kubernetes 1.37 schemas (strict)"
  else bad "kubernetes-validate: $out"; fi
  if out="$("$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$deploy/compose/compose.yaml" 2>&1)"; then
    ok "compose/compose.yaml: valid against the Compose Specification schema"
  else bad "compose schema: $out"; fi
else
  skip "Kubernetes and Compose schema validation (tools/deploy-check not installed)"
fi
skip "docker build / compose up / kubectl apply (no container engine, no cluster, and no container registry reachable for base images)"
exit $failed
