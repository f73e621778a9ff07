#!/usr/bin/env bash
# Install sockgate on a node without Kubernetes (containerd, podman, ctr): the CNI
# executable (the compiled forwarder, and this installation's Python launcher beside it
# for requests while the agent is down), a conflist that wins the runtime's lexical order, a default policy (never
# overwriting one that is there), and systemd units for the node agent and the daily
# Google ranges refresh. Idempotent: a second run changes nothing that is up to date.
#
# With --root DIR everything is laid out under DIR (a package build, a test) and nothing
# is enabled; with --root / (the default) the units are enabled and started when
# systemd runs. See README, "Kubernetes and node install".
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prog=install-node.sh
die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

usage() {
  cat <<EOF
usage: scripts/$prog [options]

Install the sockgate CNI executable, a CNI network config, a default egress policy and
the systemd units of the node agent. Run scripts/setup first (it makes the virtualenv).

  --root DIR            install under DIR instead of / (nothing is enabled or started)
  --venv DIR            sockgate virtualenv to run (default: $repo/.venv)
  --network NAME        CNI network name (default: sockgate)
  --ipv4-pool CIDR      container IPv4 pool (default: 10.77.0.0/16)
  --ipv6-pool CIDR      container IPv6 pool (default: fd77:5067:6174::/64)
  --cni-version V       conflist cniVersion (default: 1.0.0; containerd 1.6 knows no 1.1.0)
  --conflist-name NAME  file name in the CNI config dir (default: 00-sockgate.conflist)
  --policy FILE         policy to install when the node has none (default: deploy/systemd/policy.json)
  --policy-file PATH    where the node's policy lives (default: /etc/sockgate/policy.json)
  --state-dir DIR       state dir, under /var/lib (default: /var/lib/sockgate)
  --run-dir DIR         runtime dir, under /run (default: /run/sockgate)
  --metrics-address A   agent's Prometheus endpoint host:port (default: 127.0.0.1:9464)
  --cni-bin-dir DIR     (default: /opt/cni/bin)
  --cni-conf-dir DIR    (default: /etc/cni/net.d)
  --shim auto|compiled|python
                        the CNI executable (sockgate install-cni --shim; default: auto,
                        the compiled one when scripts/build-shim built it)
  --no-enable           with --root /: install the units but don't enable or start them
  --uninstall           stop and remove what this script installed, and sockgate's nft
                        table and segment meter (sockgate teardown); refused while
                        containers are attached (policy and state stay)
  -h, --help            this text
EOF
}

root=/
venv=$repo/.venv
network=sockgate
ipv4_pool=10.77.0.0/16
ipv6_pool=fd77:5067:6174::/64
cni_version=1.0.0
conflist_name=00-sockgate.conflist
policy_src=$repo/deploy/systemd/policy.json
policy_file=/etc/sockgate/policy.json
state_dir=/var/lib/sockgate
run_dir=/run/sockgate
metrics=127.0.0.1:9464
cni_bin_dir=/opt/cni/bin
cni_conf_dir=/etc/cni/net.d
shim=auto
enable=yes
uninstall=no

while (($#)); do
  opt=$1
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --no-enable) enable=no; shift; continue ;;
    --uninstall) uninstall=yes; shift; continue ;;
    --*=*) set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; continue ;;
    --root|--venv|--network|--ipv4-pool|--ipv6-pool|--cni-version|--conflist-name|--policy|\
    --policy-file|--state-dir|--run-dir|--metrics-address|--cni-bin-dir|--cni-conf-dir|--shim)
      (($# >= 2)) || die "$opt needs a value (see --help)"; val=$2; shift 2 ;;
    --*) die "unknown option: $opt (see --help)" ;;
    *) die "unexpected argument: $opt (see --help)" ;;
  esac
  case "$opt" in
    --root) root=$val ;;
    --venv) venv=$val ;;
    --network) network=$val ;;
    --ipv4-pool) ipv4_pool=$val ;;
    --ipv6-pool) ipv6_pool=$val ;;
    --cni-version) cni_version=$val ;;
    --conflist-name) conflist_name=$val ;;
    --policy) policy_src=$val ;;
    --policy-file) policy_file=$val ;;
    --state-dir) state_dir=$val ;;
    --run-dir) run_dir=$val ;;
    --metrics-address) metrics=$val ;;
    --cni-bin-dir) cni_bin_dir=$val ;;
    --cni-conf-dir) cni_conf_dir=$val ;;
    --shim) shim=$val ;;
  esac
done

# ---- checks: all before anything is written ---------------------------------------
[ -d "$root" ] || die "--root $root: no such directory"
root=$(cd "$root" && pwd -P)
if [ "$root" = / ]; then
  P=
  [ "$(id -u)" = 0 ] || die "installing into / needs root (or pass --root DIR)"
else
  P=$root
fi

for pair in "policy-file:$policy_file" "state-dir:$state_dir" "run-dir:$run_dir" \
            "cni-bin-dir:$cni_bin_dir" "cni-conf-dir:$cni_conf_dir"; do
  name=${pair%%:*} path=${pair#*:}
  case "$path" in /*) ;; *) die "--$name must be an absolute path, got '$path'" ;; esac
  case "$path" in *[[:space:]\\\"\'%@]*) die "--$name: no spaces, quotes, %, @ or backslashes, got '$path'" ;; esac
done
# systemd creates these (StateDirectory=, RuntimeDirectory=), relative to /var/lib and /run.
case "$state_dir" in /var/lib/?*) ;; *) die "--state-dir must be under /var/lib, got '$state_dir'" ;; esac
case "$run_dir" in /run/?*) ;; *) die "--run-dir must be under /run, got '$run_dir'" ;; esac
case "$conflist_name" in */*|.*|"") die "--conflist-name must be a plain file name, got '$conflist_name'" ;; esac
case "$conflist_name" in *.conflist) ;; *) die "--conflist-name must end in .conflist, got '$conflist_name'" ;; esac
case "$shim" in auto|compiled|python) ;; *) die "--shim must be auto, compiled or python, got '$shim'" ;; esac
case "$metrics" in *[[:space:]]*) die "--metrics-address: no spaces, got '$metrics'" ;; esac

sockgate=$venv/bin/sockgate
python=$venv/bin/python
if [ ! -x "$sockgate" ] || [ ! -x "$python" ]; then
  die "no sockgate in $venv (run scripts/setup first, or pass --venv DIR of a virtualenv with sockgate installed)"
fi
venv=$(cd "$venv" && pwd)
sockgate=$venv/bin/sockgate
python=$venv/bin/python

unit_dir=$P/etc/systemd/system
units=(sockgate-agent.service sockgate-ranges.service sockgate-ranges.timer)
systemd_up=no
if [ -z "$P" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemd_up=yes
fi

# ---- uninstall -----------------------------------------------------------------------
if [ "$uninstall" = yes ]; then
  # The compiled executable names its launcher (sockgate-python); a launcher runs cni_plugin.shim.
  exes=()
  for exe in "$P$cni_bin_dir/sockgate" "$P$cni_bin_dir/sockgate-python"; do
    [ -e "$exe" ] || continue
    grep -aqE 'cni_plugin\.shim|sockgate-python' "$exe" 2>/dev/null || die "$exe is not sockgate's; nothing removed"
    exes+=("$exe")
  done
  teardown=("$sockgate" teardown --state-dir "$state_dir" --run-dir "$run_dir")
  if [ -z "$P" ]; then
    # Containers still attached would lose their sandbox with the table, and their DEL
    # with the executable: refuse before anything is stopped or removed. (The agent is
    # the other blocker sockgate teardown names; it is stopped below.)
    report=$("${teardown[@]}" --check --json) || true   # 1 when something blocks (the agent, at least)
    left=$(printf '%s' "$report" | "$python" -I -c '
import json, sys
print("\n".join("  - " + b["detail"] for b in json.load(sys.stdin)["blockers"] if b["kind"] != "agent"))') ||
      die "sockgate teardown --check gave no report: $report"
    [ -z "$left" ] || die "nothing removed: containers are still attached on this node (DEL them through their runtime, or drain the node, first):
$left"
  fi
  # The conflist first: no runtime starts a sockgate container after this.
  conflist=$P$cni_conf_dir/$conflist_name
  if [ -e "$conflist" ]; then rm -f "$conflist"; say "removed $conflist"; fi
  if [ "$systemd_up" = yes ]; then
    systemctl disable --now sockgate-ranges.timer sockgate-agent.service >/dev/null 2>&1 || true
  fi
  if [ -z "$P" ]; then
    # The table's hooks see every packet of the node, and the segment meter's BPF
    # programs stay attached as long as their pins: no file removal takes them. It
    # looks again, under the table lock: a container attached since the check above
    # keeps the executable, so that its DEL works.
    if "${teardown[@]}" | sed "s/^/$prog: /"; then :; else
      status=${PIPESTATUS[0]}
      # Killed (OOM killer, kill -9): nothing refused; the rerun finishes what it left.
      [ "$status" -le 128 ] ||
        die "sockgate teardown was killed (signal $((status - 128))) before it finished. The conflist is gone and the agent stopped; the CNI executable and the units stay. Run --uninstall again: it finishes the teardown"
      die "sockgate teardown refused (see above): a container was attached meanwhile. The conflist is gone and the agent stopped; the CNI executable and the units stay, so that its DEL works. DEL it, then run --uninstall again"
    fi
  fi
  for u in "${units[@]}"; do
    if [ -e "$unit_dir/$u" ]; then rm -f "$unit_dir/$u"; say "removed $unit_dir/$u"; fi
  done
  if [ "$systemd_up" = yes ]; then systemctl daemon-reload; fi
  for exe in "${exes[@]}"; do rm -f "$exe" && say "removed $exe"; done
  say "kept the policy ($P$policy_file) and the state ($P$state_dir: leases, billing)"
  exit 0
fi

# The policy the node will run: the one that is there, else the one to install.
policy_target=$P$policy_file
if [ -e "$policy_target" ]; then
  check=$policy_target
else
  [ -f "$policy_src" ] || die "--policy $policy_src: no such file"
  check=$policy_src
fi
if ! out=$("$sockgate" policy check --policy "$check" 2>&1); then
  die "policy $check is invalid, nothing installed: ${out#sockgate policy check: error: }"
fi

# Render the conflist and validate it with the plugin's own parser (errors name the field).
conflist_text=$("$python" -I - "$cni_version" "$network" "$ipv4_pool" "$ipv6_pool" "$state_dir" \
                  "$run_dir" "$policy_file" <<'PY'
import json, sys
from runtime.defaults import SUPPORTED_VERSIONS
from runtime.errors import SockgateError
from runtime.core.netconf import parse_netconf
version, name, v4, v6, state, run, policy = sys.argv[1:]
plugin = {"type": "sockgate", "ipv4Pool": v4, "ipv6Pool": v6,
          "stateDir": state, "runDir": run, "policyFile": policy}
try:
    if version not in SUPPORTED_VERSIONS:
        raise SystemExit(f"install-node.sh: error: --cni-version {version} is not one of "
                         + ", ".join(SUPPORTED_VERSIONS))
    parse_netconf({"cniVersion": version, "name": name, **plugin})
except SockgateError as exc:
    raise SystemExit(f"install-node.sh: error: {exc}")
print(json.dumps({"cniVersion": version, "name": name, "plugins": [plugin]}, indent=2))
PY
) || exit 1

# ---- install -------------------------------------------------------------------------
changed=no   # did a unit file change (daemon-reload and restart needed)?

# put TARGET MODE: stdin to TARGET atomically (temp file in the same dir, then rename),
# only when the content differs. Prints what it did.
put() {
  local target=$1 mode=$2 dir tmp
  dir=$(dirname "$target")
  mkdir -p "$dir"
  tmp=$(mktemp "$dir/.${target##*/}.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
    rm -f "$tmp"
    say "unchanged $target"
    return 1
  fi
  mv -f "$tmp" "$target"
  say "installed $target"
}

# `sockgate install-cni` writes the executable (compiled, with the launcher for this
# virtualenv's Python beside it; or the launcher alone: it says why on stderr); staged in
# a temp dir so that unchanged files are left alone. The launcher first: the compiled
# executable looks for it only when no agent answers.
stage=$(mktemp -d -t sockgate-install.XXXXXX)
trap 'rm -rf "$stage"' EXIT
"$sockgate" install-cni --bin-dir "$stage" --shim "$shim" >/dev/null || die "sockgate install-cni failed"
if [ -f "$stage/sockgate-python" ]; then
  put "$P$cni_bin_dir/sockgate-python" 0755 <"$stage/sockgate-python" || true
elif [ -e "$P$cni_bin_dir/sockgate-python" ]; then
  # A compiled install's launcher, now that the launcher itself is the executable.
  rm -f "$P$cni_bin_dir/sockgate-python" && say "removed $P$cni_bin_dir/sockgate-python"
fi
put "$P$cni_bin_dir/sockgate" 0755 <"$stage/sockgate" || true

put "$P$cni_conf_dir/$conflist_name" 0644 <<<"$conflist_text" || true

if [ -e "$policy_target" ]; then
  say "kept $policy_target (an existing policy is never overwritten)"
else
  put "$policy_target" 0644 <"$policy_src" || true
fi

for u in "${units[@]}"; do
  unit_text=$("$python" -I - "$repo/deploy/systemd/$u" \
      "@REPO@=$repo" "@SOCKGATE@=$sockgate" "@STATE_DIR@=$state_dir" "@RUN_DIR@=$run_dir" \
      "@POLICY_FILE@=$policy_file" "@METRICS_ADDRESS@=${metrics:-\"\"}" \
      "@STATE_DIRECTORY@=${state_dir#/var/lib/}" "@RUNTIME_DIRECTORY@=${run_dir#/run/}" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for pair in sys.argv[2:]:
    key, value = pair.split("=", 1)
    text = text.replace(key, value)
left = re.findall(r"@[A-Z_]+@", text)
if left:
    raise SystemExit(f"unfilled placeholders in {sys.argv[1]}: {left}")
sys.stdout.write(text)
PY
) || die "cannot render $u"
  put "$unit_dir/$u" 0644 <<<"$unit_text" && changed=yes
done

# The runtime takes the lexically first config file (Go's byte order).
shopt -s nullglob
configs=("$P$cni_conf_dir"/*.conf "$P$cni_conf_dir"/*.conflist "$P$cni_conf_dir"/*.json)
shopt -u nullglob
first=$(printf '%s\n' "${configs[@]##*/}" | LC_ALL=C sort | head -n1)
if [ "$first" != "$conflist_name" ]; then
  echo "$prog: warning: $first sorts before $conflist_name in $P$cni_conf_dir: runtimes will use $first" >&2
fi

# ---- enable --------------------------------------------------------------------------
if [ -n "$P" ]; then
  say "laid out under $root; nothing enabled (--root)"
elif [ "$enable" = no ]; then
  say "not enabled (--no-enable); to start: systemctl daemon-reload && systemctl enable --now sockgate-ranges.timer sockgate-agent.service"
elif [ "$systemd_up" = no ]; then
  say "systemd is not running here; start the agent yourself: $sockgate agent --state-dir $state_dir --run-dir $run_dir --policy $policy_file"
else
  systemctl daemon-reload
  systemctl enable --now sockgate-ranges.timer >/dev/null
  systemctl enable sockgate-agent.service >/dev/null
  if [ "$changed" = yes ]; then
    systemctl restart sockgate-agent.service
  else
    systemctl start sockgate-agent.service
  fi
  say "sockgate-agent.service enabled and running; sockgate-ranges.timer enabled"
fi
