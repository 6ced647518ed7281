# bench/lib/memory.sh: worker resident memory after 100k and after 1M events
# (doc/DESIGN.md 9, last row).
#
# A fresh cluster "m" with the default mqtt_emit.queue_size (so the shared
# ring is touched completely within the first 100k events and the shared part
# of RSS is the same at both points). A procedure inserts rows into a watched
# table in transactions of 5k rows, waiting whenever the queue is more than
# half full (so nothing spills into the outbox: this measures the memory
# path). When the worker has published 100k (then 1M) events and the queue
# is empty, VmRSS, RssAnon and RssShmem of the worker (pid from
# mqtt_emit.stats.worker_pid) are read from /proc/PID/status.

mem_fill() {
	local n="$1"
	q m -c "CALL mem_fill($n, 5000)" >/dev/null
}

mem_published_at_least() {
	[[ "$(q m -c "SELECT published >= $1 AND queued = 0 FROM mqtt_emit.stats")" == t ]]
}

mem_sample() {
	local label="$1" pid="$2"
	local rss anon shm
	rss="$(proc_status "$pid" VmRSS)"
	anon="$(proc_status "$pid" RssAnon)"
	shm="$(proc_status "$pid" RssShmem)"
	fig "mem_worker_vmrss_${label}_kb" "$rss"
	fig "mem_worker_rssanon_${label}_kb" "$anon"
	fig "mem_worker_rssshmem_${label}_kb" "$shm"
	printf '%s\t%s\t%s\t%s\n' "$label" "$rss" "$anon" "$shm" >>"$RESULTS/memory.tsv"
	MEM_RSS="$rss" MEM_ANON="$anon"
}

bench_memory() {
	local small big label_small label_big
	small="$(quick 100000 20000)"
	big="$(quick 1000000 200000)"
	label_small="$((small / 1000))k"
	if ((big >= 1000000)); then label_big="$((big / 1000000))M"; else label_big="$((big / 1000))k"; fi

	start_cluster m
	q m <<-'SQL' >/dev/null
		CREATE TABLE mem_t (id bigint, note text);
		SELECT mqtt_emit.watch('mem_t', model => 'mem');
		CREATE PROCEDURE mem_fill(n int, batch int) LANGUAGE plpgsql AS $$
		DECLARE
		    done int := 0;
		    base bigint := (SELECT coalesce(max(id), 0) FROM mem_t);
		BEGIN
		    WHILE done < n LOOP
		        WHILE (SELECT queue_bytes * 2 > queue_capacity FROM mqtt_emit.stats) LOOP
		            PERFORM pg_sleep(0.005);
		        END LOOP;
		        INSERT INTO mem_t
		        SELECT base + done + g, 'note ' || (base + done + g)
		          FROM generate_series(1, least(batch, n - done)) g;
		        done := done + least(batch, n - done);
		        COMMIT;
		    END LOOP;
		END $$;
	SQL
	local pid published0
	pid="$(q m -c 'SELECT worker_pid FROM mqtt_emit.stats')"
	published0="$(q m -c 'SELECT published FROM mqtt_emit.stats')"
	fig mem_worker_vmrss_start_kb "$(proc_status "$pid" VmRSS)"
	: >"$RESULTS/memory.tsv"

	local t0=$SECONDS
	mem_fill "$small"
	pm_poll 600 mem_published_at_least "$((published0 + small))" || note "WARNING: not all $small events published"
	mem_sample "$label_small" "$pid"
	local rss_small="$MEM_RSS" anon_small="$MEM_ANON"

	mem_fill "$((big - small))"
	pm_poll 900 mem_published_at_least "$((published0 + big))" || note "WARNING: not all $big events published"
	mem_sample "$label_big" "$pid"
	local secs=$((SECONDS - t0))

	if [[ "$(q m -c 'SELECT worker_pid FROM mqtt_emit.stats')" != "$pid" ]]; then
		fig mem_warning "the worker restarted during the run"
	fi
	fig "mem_ratio_vmrss_${label_big}_${label_small}" "$(fmt 3 "$(calc "$MEM_RSS / $rss_small")") (target <= 1.1)"
	fig "mem_ratio_rssanon_${label_big}_${label_small}" "$(fmt 3 "$(calc "$MEM_ANON / $anon_small")")"
	fig mem_events_per_s "$(fmt 0 "$(calc "$big / $secs")") ($big events in ${secs}s, inserted in 5k-row transactions)"
	fig mem_spilled "$(q m -c 'SELECT spilled FROM mqtt_emit.stats')"
	stop_cluster m
}
