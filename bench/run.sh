#!/usr/bin/env bash
# bench/run.sh: cryptnbd against peer NBD servers, one server at a time, on
# 127.0.0.1, every image in tmpfs. `make bench` runs it; see bench/README.md.
#
# Parameters (environment variables):
#   QUICK=1         smoke run: 1 round, 512M image, 2 s per fio workload (~4 min)
#   ROUNDS=3        rounds; the report takes the median of each figure
#   SIZE=2G         export size (suffixes K M G, powers of 1024)
#   RUNTIME=5       seconds per fio workload
#   TMPFS=/dev/shm  where images live; must be tmpfs (if it is not and we are
#                   root, a tmpfs is mounted on a temporary directory instead)
#   SERVERS="cryptnbd cryptnbd-tls cryptnbd-azblob cryptnbd-nomap nbdkit nbdkit-luks qemu-nbd qemu-nbd-luks nbd-server"
#   WORKLOADS="copy-in copy-out seq-write seq-read rand-read rand-write mixed mem-4k mem-1m"
#                   copy-in must stay first: it fills the image, so every read
#                   test reads real data
#   PORT=10899      first TCP port tried; the next free one is used
#   PROFILE=1       afterwards, CPU profiles of cryptnbd's server code under
#                   rand-read and seq-write (bench/cmd/profserve, go tool pprof)
#   MAX_LOAD=       if set (e.g. 1.0), wait up to WAIT_QUIET seconds (default
#                   1200) for the 1-minute load average to drop below it
#   OUT=bench/results/<UTC timestamp>
#   CRYPTNBD_BIN=   use this cryptnbd binary instead of building ./cmd/cryptnbd
#   NO_INSTALL=1    never call apt-get
set -euo pipefail

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
	ROUNDS=${ROUNDS:-1} SIZE=${SIZE:-512M} RUNTIME=${RUNTIME:-2}
else
	ROUNDS=${ROUNDS:-3} SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-5}
fi
TMPFS=${TMPFS:-/dev/shm}
DEFAULT_SERVERS="cryptnbd cryptnbd-tls cryptnbd-azblob cryptnbd-nomap nbdkit nbdkit-luks qemu-nbd qemu-nbd-luks nbd-server"
SERVERS=${SERVERS:-$DEFAULT_SERVERS}
WORKLOADS=${WORKLOADS:-copy-in copy-out seq-write seq-read rand-read rand-write mixed mem-4k mem-1m}
PORT=${PORT:-10899}
PROFILE=${PROFILE:-1}
MAX_LOAD=${MAX_LOAD:-}
WAIT_QUIET=${WAIT_QUIET:-1200}
NO_INSTALL=${NO_INSTALL:-0}
CRYPTNBD_BIN=${CRYPTNBD_BIN:-}
PASS=bench-passphrase # throwaway passphrase of throwaway images
EXPORT=bench

REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-$REPO/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
RAW=$OUT/raw
GO=${GO:-go}
command -v "$GO" >/dev/null 2>&1 || GO=/usr/local/go/bin/go

log() { printf '%s bench: %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- setup

# Debian package for each command the benchmark runs.
declare -A PKG=(
	[nbdkit]=nbdkit [qemu-nbd]=qemu-utils [qemu-img]=qemu-utils
	[nbd-server]=nbd-server [fio]=fio [nbdcopy]=libnbd-bin [nbdinfo]=libnbd-bin
	[cryptsetup]=cryptsetup-bin [numfmt]=coreutils [lscpu]=util-linux
)
install_deps() {
	local missing=() c
	for c in "${!PKG[@]}"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("${PKG[$c]}")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	[ "$NO_INSTALL" = 1 ] && die "missing packages: ${missing[*]} (NO_INSTALL=1)"
	local sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	log "installing ${missing[*]}"
	$sudo apt-get update -q
	# nbd-server's package starts a system service with no exports; harmless.
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
	local p=$PORT
	while port_busy "$p"; do p=$((p + 1)); done
	echo "$p"
}

# Waits for the 1-minute load average to fall below MAX_LOAD.
wait_quiet() {
	[ -n "$MAX_LOAD" ] || return 0
	local waited=0 load
	while :; do
		load=$(cut -d' ' -f1 /proc/loadavg)
		awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN{exit !(l < m)}' && { log "load $load < $MAX_LOAD"; return 0; }
		[ "$waited" -ge "$WAIT_QUIET" ] && { log "load still $load after ${waited}s; running anyway (noted in machine.txt)"; return 0; }
		log "load $load >= $MAX_LOAD, waiting"
		sleep 30
		waited=$((waited + 30))
	done
}

# ---------------------------------------------------------------- CPU time

CLK_TCK=$(getconf CLK_TCK)

# tree_pids PID: PID and all its descendants.
tree_pids() {
	local p=$1 c
	echo "$p"
	for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

# cpu_ticks PID: user+system clock ticks of PID and its live descendants,
# plus the reaped children's (cutime, cstime): nbd-server forks per
# connection and reaps the child when it ends.
cpu_ticks() {
	local total=0 p s f
	for p in $(tree_pids "$1"); do
		s=$(cat /proc/"$p"/stat 2>/dev/null) || continue
		s=${s##*) } # the command name may hold spaces and parentheses
		read -r -a f <<<"$s"
		total=$((total + f[11] + f[12] + f[13] + f[14]))
	done
	echo "$total"
}

now() { date +%s.%N; }

# ---------------------------------------------------------------- memory

# mem_kib PID: sets MEM to VmRSS, RssAnon, RssFile and RssShmem in KiB,
# summed over PID and its descendants (nbd-server forks a process per
# connection). Bash builtins only: it runs five times a second beside the
# server under test.
mem_kib() {
	local -a todo=("$1") kids
	local p k v t
	MEM=(0 0 0 0)
	while [ ${#todo[@]} -gt 0 ]; do
		p=${todo[0]}
		todo=("${todo[@]:1}")
		while read -r k v _; do
			case $k in
			VmRSS:) MEM[0]=$((MEM[0] + v)) ;;
			RssAnon:) MEM[1]=$((MEM[1] + v)) ;;
			RssFile:) MEM[2]=$((MEM[2] + v)) ;;
			RssShmem:) MEM[3]=$((MEM[3] + v)) ;;
			esac
		done 2>/dev/null <"/proc/$p/status" || continue # it has exited
		for t in /proc/"$p"/task/*/children; do
			kids=()
			# The list has no final newline, so read reports EOF.
			read -r -a kids 2>/dev/null <"$t" || true
			todo+=("${kids[@]}")
		done
	done
	return 0
}

# sample_mem PID OUT: samples mem_kib every 0.2 s until terminated, then
# writes the peak of each figure (each its own maximum) to OUT.
sample_mem() {
	local -a peak=(0 0 0 0)
	local i stop=0
	trap 'stop=1' TERM
	while [ "$stop" = 0 ]; do
		mem_kib "$1"
		for i in 0 1 2 3; do
			[ "${MEM[i]}" -gt "${peak[i]}" ] && peak[i]=${MEM[i]}
		done
		sleep 0.2
	done
	echo "${peak[*]}" >"$2"
}

# ---------------------------------------------------------------- servers
# Each server has prepare_X (make the image in $W), start_X (run it in the
# background on $P, setting SPID) and an image of exactly $SIZE_BYTES of
# data. Encrypted images carry a header in front: 16 MiB for cryptnbd and
# the cryptsetup image, about 2 MiB for qemu-img's.

prepare_cryptnbd() {
	"$CRYPTNBD" disk create "$EXPORT" --size "$SIZE_BYTES" --data-dir "$W/cryptnbd" >/dev/null
}
start_cryptnbd() {
	"$CRYPTNBD" serve --data-dir "$W/cryptnbd" --listen "127.0.0.1:$P" --metrics-listen '' \
		--log-level warn >"$W/server.log" 2>&1 &
	SPID=$!
}

# cryptnbd-nomap: the same disk with --mmap=false, read and written with
# pread and pwrite instead of through a mapping, so that one run shows both
# sides of that choice: speed with the mapping, RSS without it.
prepare_cryptnbd-nomap() { prepare_cryptnbd; }
start_cryptnbd-nomap() {
	"$CRYPTNBD" serve --data-dir "$W/cryptnbd" --listen "127.0.0.1:$P" --metrics-listen '' \
		--mmap=false --log-level warn >"$W/server.log" 2>&1 &
	SPID=$!
}

# cryptnbd-tls: the same disk served with --tls require, so the report
# shows what STARTTLS costs beside plain TCP in the same run. The client
# does not verify the server (fio cannot be given a CA through the URI);
# the session is encrypted all the same.
prepare_cryptnbd-tls() {
	"$CRYPTNBD" disk create "$EXPORT" --size "$SIZE_BYTES" --data-dir "$W/cryptnbd" >/dev/null
	"$CRYPTNBD" tls init --out "$W/tls" >/dev/null
}
start_cryptnbd-tls() {
	"$CRYPTNBD" serve --data-dir "$W/cryptnbd" --listen "127.0.0.1:$P" --metrics-listen '' \
		--tls require --tls-cert "$W/tls/server-cert.pem" --tls-key "$W/tls/server-key.pem" \
		--log-level warn >"$W/server.log" 2>&1 &
	SPID=$!
	URI="nbds://127.0.0.1:$P/$EXPORT?tls-verify-peer=false"
}

# cryptnbd-azblob: disks as page blobs in Azurite, the Azure Storage
# emulator (in memory). Azurite is a functional emulator, not a speed
# reference: this row shows the path works under load, not what Azure does.
AZURITE_PID=""
prepare_cryptnbd-azblob() {
	local ap log i
	# free_port returns the first unbound port, which is still $P: the
	# daemon has not bound it yet.
	ap=$(free_port)
	while [ "$ap" = "$P" ] || port_busy "$ap"; do ap=$((ap + 1)); done
	log=$W/azurite.log
	"$REPO/deploy/azurite/run.sh" --blobHost 127.0.0.1 --blobPort "$ap" --inMemoryPersistence \
		--skipApiVersionCheck --loose --disableTelemetry >"$log" 2>&1 &
	AZURITE_PID=$!
	for i in $(seq 600); do
		grep -q "listens on" "$log" 2>/dev/null && break
		kill -0 "$AZURITE_PID" 2>/dev/null || die "azurite did not start: $(cat "$log")"
		sleep 0.2
	done
	AZBLOB="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$ap/devstoreaccount1;"
}
start_cryptnbd-azblob() {
	CRYPTNBD_AZBLOB_CONNECTION_STRING=$AZBLOB "$CRYPTNBD" serve --data-dir "$W/cryptnbd" --store azblob \
		--azblob-container bench --demo-disk "$EXPORT" --demo-size "$SIZE_BYTES" \
		--listen "127.0.0.1:$P" --metrics-listen '' --log-level warn >"$W/server.log" 2>&1 &
	SPID=$!
}

prepare_nbdkit() { truncate -s "$SIZE_BYTES" "$W/raw.img"; }
start_nbdkit() {
	nbdkit -f -i 127.0.0.1 -p "$P" -e "$EXPORT" file file="$W/raw.img" >"$W/server.log" 2>&1 &
	SPID=$!
}

# nbdkit's luks filter reads LUKS1 only, and LUKS1 has 512-byte sectors.
prepare_nbdkit-luks() {
	printf '%s' "$PASS" >"$W/pass"
	truncate -s $((SIZE_BYTES + (16 << 20))) "$W/luks1.img"
	cryptsetup luksFormat --batch-mode --type luks1 --cipher aes-xts-plain64 --key-size 512 \
		--hash sha256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --offset 32768 \
		--key-file "$W/pass" "$W/luks1.img"
}
start_nbdkit-luks() {
	nbdkit -f -i 127.0.0.1 -p "$P" -e "$EXPORT" --filter=luks file file="$W/luks1.img" \
		passphrase="$PASS" >"$W/server.log" 2>&1 &
	SPID=$!
}

# qemu-nbd: -t keeps it running after the first client leaves, --shared
# lets fio's and nbdcopy's 4 connections in at once.
prepare_qemu-nbd() { truncate -s "$SIZE_BYTES" "$W/raw.img"; }
start_qemu-nbd() {
	qemu-nbd -t --shared=16 -x "$EXPORT" -b 127.0.0.1 -p "$P" -f raw "$W/raw.img" >"$W/server.log" 2>&1 &
	SPID=$!
}

# qemu-img times its PBKDF with the thread's CPU clock and now and then
# gives up ("Unable to get accurate CPU usage") on a busy machine: retried.
prepare_qemu-nbd-luks() {
	local try
	for try in 1 2 3; do
		rm -f "$W/qluks.img"
		qemu-img create -q -f luks --object secret,id=sec0,data="$PASS" \
			-o key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256 \
			"$W/qluks.img" "$SIZE_BYTES" && return 0
		log "qemu-img create failed (attempt $try of 3)"
		sleep 1
	done
	return 1
}
start_qemu-nbd-luks() {
	qemu-nbd -t --shared=16 -x "$EXPORT" -b 127.0.0.1 -p "$P" \
		--object secret,id=sec0,data="$PASS" \
		--image-opts driver=luks,key-secret=sec0,file.driver=file,file.filename="$W/qluks.img" \
		>"$W/server.log" 2>&1 &
	SPID=$!
}

# nbd-server -d serves one connection and exits, so it runs as a daemon
# (one process per connection) and is found by its config path.
prepare_nbd-server() {
	truncate -s "$SIZE_BYTES" "$W/raw.img"
	cat >"$W/nbd-server.conf" <<-EOF
		[generic]
		    listenaddr = 127.0.0.1
		    port = $P
		    allowlist = false
		[$EXPORT]
		    exportname = $W/raw.img
	EOF
}
ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$W/nbd-server.conf"; }
start_nbd-server() {
	nbd-server -C "$W/nbd-server.conf" >"$W/server.log" 2>&1
	SPID=""
	local i p
	for i in $(seq 50); do
		for p in $(pgrep -x nbd-server); do
			# The daemon is the one process using our config whose
			# parent is not: per-connection children are its own.
			ours "$p" && ! ours "$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null)" && SPID=$p
		done
		[ -n "$SPID" ] && return 0
		sleep 0.1
	done
	die "nbd-server did not start: $(cat "$W/server.log")"
}

stop_server() {
	[ -n "${SPID:-}" ] || { stop_azurite; return 0; }
	local pids
	pids=$(tree_pids "$SPID")
	kill $pids 2>/dev/null || true
	for _ in $(seq 100); do
		kill -0 "$SPID" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 $pids 2>/dev/null || true
	wait "$SPID" 2>/dev/null || true
	SPID=""
	stop_azurite
}

stop_azurite() {
	[ -n "$AZURITE_PID" ] || return 0
	kill $(tree_pids "$AZURITE_PID") 2>/dev/null || true
	wait "$AZURITE_PID" 2>/dev/null || true
	AZURITE_PID=""
}

wait_ready() {
	local i
	for i in $(seq 150); do
		nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
		kill -0 "$SPID" 2>/dev/null || die "$1 exited: $(cat "$W/server.log")"
		sleep 0.1
	done
	die "$1 not ready on $URI: $(cat "$W/server.log")"
}

# ---------------------------------------------------------------- workloads

fio_args() {
	case $1 in
	seq-read) echo --rw=read --bs=1M --iodepth=8 ;;
	seq-write) echo --rw=write --bs=1M --iodepth=8 ;;
	rand-read) echo --rw=randread --bs=4k --iodepth=32 ;;
	rand-write) echo --rw=randwrite --bs=4k --iodepth=32 ;;
	mixed) echo --rw=randrw --rwmixread=70 --bs=4k --numjobs=4 --iodepth=16 --group_reporting ;;
	# The memory workloads: the most requests a client keeps in flight in
	# this benchmark, 4 connections × QD 128, at both request sizes.
	mem-1m) echo --rw=randread --bs=1M --numjobs=4 --iodepth=128 --group_reporting ;;
	mem-4k) echo --rw=randread --bs=4k --numjobs=4 --iodepth=128 --group_reporting ;;
	*) return 1 ;;
	esac
}

# run_workload SERVER WORKLOAD ROUND: one timed run, one line of runs.tsv.
run_workload() {
	local server=$1 wl=$2 round=$3 base json="-" rc=0 t0 t1 c0 c1 bytes=0 load mpid mem
	base=$RAW/$server.$wl.r$round
	load=$(cut -d' ' -f1 /proc/loadavg)
	sample_mem "$SPID" "$base.mem" &
	mpid=$!
	c0=$(cpu_ticks "$SPID")
	t0=$(now)
	case $wl in
	copy-in) # file -> export; also the fill pass before the read tests
		timeout 900 nbdcopy "$SRC" "$URI" 2>"$base.err" || rc=$?
		bytes=$SIZE_BYTES ;;
	copy-out) # export -> nowhere
		timeout 900 nbdcopy "$URI" null: 2>"$base.err" || rc=$?
		bytes=$SIZE_BYTES ;;
	*)
		json=$base.json
		# fio's nbd engine prints to stdout, hence --output. No ramp time,
		# so the bytes fio reports and the CPU time measured cover the
		# same interval.
		# shellcheck disable=SC2046
		timeout $((RUNTIME + 120)) fio --name="$wl" --ioengine=nbd --uri="$URI" \
			$(fio_args "$wl") --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 \
			--lat_percentiles=1 --output-format=json --output="$json" >"$base.err" 2>&1 || rc=$?
		json=$(basename "$json") ;;
	esac
	t1=$(now)
	c1=$(cpu_ticks "$SPID")
	kill -TERM "$mpid" 2>/dev/null || true
	wait "$mpid" 2>/dev/null || true
	mem=$(tr ' ' '\t' <"$base.mem" 2>/dev/null) || mem=""
	[ -n "$mem" ] || mem=$(printf -- '-\t-\t-\t-')
	rm -f "$base.mem"
	[ -s "$base.err" ] || rm -f "$base.err"
	if [ "$rc" != 0 ]; then
		log "$server $wl round $round failed (exit $rc), see $base.err"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$server" "$wl" \
		"$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')" \
		"$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/t}')" \
		"$bytes" "$json" "$rc" "$load" "$mem" >>"$RAW/runs.tsv"
}

# ---------------------------------------------------------------- profile

# Runs bench/cmd/profserve (the daemon's nbd.Server over a cryptodisk.Disk,
# with a CPU profile switched on by SIGUSR1 and written on SIGUSR2) under
# rand-read and seq-write, and keeps pprof's top entries.
profile_cryptnbd() {
	local prof=$OUT/profile wl n=0
	mkdir -p "$prof"
	W=$WORK/profile
	mkdir -p "$W"
	prepare_cryptnbd
	P=$(free_port)
	URI=nbd://127.0.0.1:$P/$EXPORT
	"$TOOLS/profserve" -data-dir "$W/cryptnbd" -disk "$EXPORT" -listen "127.0.0.1:$P" \
		-cpuprofile "$prof/cpu" >"$W/server.log" 2>&1 &
	SPID=$!
	wait_ready profserve
	nbdcopy "$SRC" "$URI"
	for wl in rand-read seq-write; do
		n=$((n + 1))
		kill -USR1 "$SPID"
		sleep 0.2
		# shellcheck disable=SC2046
		fio --name="$wl" --ioengine=nbd --uri="$URI" $(fio_args "$wl") --time_based \
			--runtime="$RUNTIME" --norandommap --randrepeat=0 --output-format=json \
			--output="$prof/$wl.fio.json" >/dev/null 2>&1
		kill -USR2 "$SPID"
		for _ in $(seq 100); do [ -s "$prof/cpu.$n.pprof" ] && break; sleep 0.1; done
		mv "$prof/cpu.$n.pprof" "$prof/$wl.pprof"
		"$GO" tool pprof -top -nodecount=25 "$TOOLS/profserve" "$prof/$wl.pprof" >"$prof/$wl.top.txt" 2>/dev/null || true
		"$GO" tool pprof -top -cum -nodecount=25 "$TOOLS/profserve" "$prof/$wl.pprof" >"$prof/$wl.cum.txt" 2>/dev/null || true
	done
	cp "$TOOLS/profserve" "$prof/profserve.bin"
	stop_server
	rm -rf "$W"
	log "profiles in $prof"
}

# ---------------------------------------------------------------- machine

describe_machine() {
	{
		echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
		echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
		echo "cpus: $(nproc) online ($(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core)"
		echo "cpu flags: $(grep -o -w -E 'aes|avx2|vaes|vpclmulqdq|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')"
		echo "hypervisor: $(lscpu | sed -n 's/^Hypervisor vendor: *//p')"
		echo "memory: $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
		echo "kernel: $(uname -sr)"
		echo "os: $(. /etc/os-release && echo "$PRETTY_NAME")"
		echo "go: $("$GO" version)"
		if [ -n "$CRYPTNBD_BIN" ]; then
			echo "cryptnbd: prebuilt $CRYPTNBD_BIN (CRYPTNBD_BIN; the tree is at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"
		else
			echo "cryptnbd: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
		fi
		echo "nbdkit: $(nbdkit --version | head -1)"
		echo "qemu-nbd: $(qemu-nbd --version | head -1)"
		echo "nbd-server: $(nbd-server --version 2>&1 | sed -n 's/.*version //p' | head -1)"
		echo "fio: $(fio --version)"
		echo "nbdcopy: $(nbdcopy --version | head -1)"
		echo "cryptsetup: $(cryptsetup --version)"
		echo "image: $SIZE ($SIZE_BYTES bytes) in $TMPFS_DIR ($(stat -f -c %T "$TMPFS_DIR"))"
		echo "rounds: $ROUNDS; fio runtime: ${RUNTIME}s per workload; quick: $QUICK"
		echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
		echo "command: make bench SIZE=$SIZE ROUNDS=$ROUNDS RUNTIME=$RUNTIME$([ "$SERVERS" = "$DEFAULT_SERVERS" ] || echo " SERVERS=\"$SERVERS\"")"
	} >"$OUT/machine.txt"
}

# ---------------------------------------------------------------- main

cleanup() {
	stop_server
	[ -n "${WORK:-}" ] && rm -rf "$WORK"
	[ -n "${TOOLS:-}" ] && rm -rf "$TOOLS"
	if [ -n "${MOUNTED:-}" ]; then umount "$MOUNTED" && rmdir "$MOUNTED"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_deps
[ "$(printf '%s\n' $SERVERS | sort | uniq -d)" = "" ] || die "SERVERS lists a server twice: $SERVERS"
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
[ $((SIZE_BYTES % 1048576)) -eq 0 ] || die "SIZE must be a whole number of MiB"

need=$((2 * SIZE_BYTES + (64 << 20)))
TMPFS_DIR=$TMPFS
if [ "$(stat -f -c %T "$TMPFS" 2>/dev/null)" != tmpfs ]; then
	[ "$(id -u)" = 0 ] || die "$TMPFS is not tmpfs; set TMPFS to a tmpfs directory"
	MOUNTED=$(mktemp -d /tmp/cryptnbd-bench-tmpfs.XXXXXX)
	mount -t tmpfs -o size=$((need + (64 << 20))) cryptnbd-bench "$MOUNTED"
	TMPFS_DIR=$MOUNTED
	log "$TMPFS is not tmpfs; mounted a tmpfs on $MOUNTED"
fi
avail=$(($(stat -f -c '%a * %S' "$TMPFS_DIR")))
[ "$avail" -ge "$need" ] || die "$TMPFS_DIR has $((avail >> 20)) MiB free, needs $((need >> 20)) MiB (SIZE=$SIZE)"

WORK=$(mktemp -d "$TMPFS_DIR/cryptnbd-bench.XXXXXX")
# Binaries stay off tmpfs: a program run from tmpfs counts its own text in
# RssShmem, which the report keeps for the image mapped into cryptnbd.
TOOLS=$(mktemp -d "${TMPDIR:-/var/tmp}/cryptnbd-bench-tools.XXXXXX")
mkdir -p "$RAW"
log "building cryptnbd, benchreport and profserve"
if [ -n "$CRYPTNBD_BIN" ]; then
	cp "$CRYPTNBD_BIN" "$TOOLS/cryptnbd"
else
	(cd "$REPO" && "$GO" build -o "$TOOLS/cryptnbd" ./cmd/cryptnbd)
fi
CRYPTNBD=$TOOLS/cryptnbd
(cd "$REPO/bench/cmd/benchreport" && "$GO" build -o "$TOOLS/benchreport" .)
if [ "$PROFILE" = 1 ] && ! (cd "$REPO" && "$GO" build -o "$TOOLS/profserve" ./bench/cmd/profserve); then
	log "profserve does not build; skipping the profile"
	PROFILE=0
fi

wait_quiet
describe_machine
log "source data: $SIZE of random bytes"
SRC=$WORK/source.bin
head -c "$SIZE_BYTES" /dev/urandom >"$SRC"
printf 'round\tserver\tworkload\twall_s\tcpu_s\tbytes\tfio_json\texit\tload1\trss_kib\tanon_kib\tfile_kib\tshmem_kib\n' >"$RAW/runs.tsv"

start=$(date +%s)
# Rounds go around all servers, so slow drifts in machine load hit every
# server alike. Each round starts from a fresh image.
for round in $(seq "$ROUNDS"); do
	for server in $SERVERS; do
		declare -F "start_$server" >/dev/null || die "unknown server $server"
		W=$WORK/$server
		mkdir -p "$W"
		P=$(free_port)
		URI=nbd://127.0.0.1:$P/$EXPORT
		"prepare_$server"
		"start_$server"
		wait_ready "$server"
		log "round $round/$ROUNDS: $server (pid $SPID, port $P)"
		for wl in $WORKLOADS; do
			run_workload "$server" "$wl" "$round"
		done
		stop_server
		rm -rf "$W"
	done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
echo "benchmark time: $(($(date +%s) - start)) s" >>"$OUT/machine.txt"

[ "$PROFILE" = 1 ] && profile_cryptnbd

"$TOOLS/benchreport" -dir "$OUT"
log "results in $OUT (report.md, results.csv, chart.png, chart.svg, raw/)"
