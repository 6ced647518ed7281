# bench/lib/paho.sh: what paho itself costs per QoS 1 message on this
# machine, the floor under the extension's publish rate (issue 16).
#
# Both reference publishers send N messages of 200 bytes to the bench's
# mosquitto, no subscriber, each waiting for room in a window of W
# unacknowledged messages: bare_publisher (MQTTAsync, what the worker
# drives: a send thread and a receive thread, one command per message) and
# sync_publisher (MQTTClient: writes in the caller's thread, a receive
# thread for the PUBACKs).  Figures: msg/s (first send -> last PUBACK) and
# the publisher's CPU per message (user + system, all its threads, from
# the children times of the shell that waits for it).
# BENCH_PAHO_N (100000), BENCH_PAHO_WINDOWS ("10 60 100 1000").

# paho_run PROGRAM WINDOW QOS: prints "MSGS_PER_S CPU_US_PER_MSG"
paho_run() {
	local prog="$1" w="$2" qos="$3" n="${BENCH_PAHO_N:-100000}" out rate cpu t0 t1
	local me="$BASHPID"			# read here: inside $( ) it would be that subshell's
	out="$WORK/paho.$prog.$w.$qos.out"
	# CPU of the child: the difference of this shell's children times
	t0="$(awk '{print $14 + $15 + $16 + $17}' /proc/$me/stat)"
	"$BENCH_BIN/$prog" -u "$BROKER_URL" -t "$TOPIC_PREFIX/paho/$prog" -n "$n" -s 200 \
		-q "$qos" -w "$w" -T 300 -i "bench_paho_$RUN_ID" >"$out" 2>"$out.err" || cat "$out.err" >&2
	t1="$(awk '{print $14 + $15 + $16 + $17}' /proc/$me/stat)"
	rate="$(kv "$out" msgs_per_s)"
	cpu="$(calc "($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / $n")"
	echo "${rate:-NA} $(fmt 1 "$cpu")"
}

bench_paho() {
	local w prog r windows
	read -r -a windows <<<"${BENCH_PAHO_WINDOWS:-10 60 100 1000}"
	for w in "${windows[@]}"; do
		for prog in bare_publisher sync_publisher; do
			r="$(paho_run "$prog" "$w" 1)"
			fig "paho_${prog}_qos1_window_${w}" "${r% *} msg/s, ${r#* } us CPU per message"
		done
	done
	r="$(paho_run sync_publisher 1000 0)"
	fig paho_sync_publisher_qos0 "${r% *} msg/s, ${r#* } us CPU per message"
}
