# bench/lib/latency.sh: commit on node A -> listener running on node B
# (doc/DESIGN.md 9, fifth row).
#
# Node "la" (A) has track_commit_timestamp = on and a watched table
# lat_t(id, v). Node "lb" (B) has a PL/pgSQL listener for model "lat"
# (allow_remote, remote_only) that records the event's row id and
# clock_timestamp() when it runs. pgbench on A inserts one row per
# transaction at a steady 1,000 transactions/s (-R 1000, 4 clients) for
# 20 s. Afterwards B's records are copied to A and joined on the id with
# pg_xact_commit_timestamp(xmin) of each row: latency = listener time -
# commit time (both servers run on this machine and share its clock).
#
# PostgreSQL takes the commit timestamp before it flushes the commit record,
# and pg_mqtt_emit queues the events after the flush, so with
# synchronous_commit = on the WAL flush (fsync = on) is part of the figure.
# The run is repeated with synchronous_commit = off on A.

lat_measure() {
	local label="$1" opts="$2" dur="$3" rate="$4"
	local first last_id total got out
	first="$(q la -c 'SELECT coalesce(max(id), 0) FROM lat_t')"
	out="$(PGOPTIONS="$opts" pgb la -n -M prepared -c 4 -j 2 -R "$rate" -T "$dur" -f "$WORK/lat_insert.sql" 2>&1)" ||
		{ echo "$out" >&2; pm_die "pgbench on la failed"; }
	note "$label: $(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | head -n1) tps, $(sed -n 's/^rate limit schedule lag: //p' <<<"$out")"
	last_id="$(q la -c 'SELECT coalesce(max(id), 0) FROM lat_t')"
	total="$(q la -c "SELECT count(*) FROM lat_t WHERE id > $first")"
	LAT_FIRST="$first" LAT_LAST="$last_id" LAT_WANT="$total"
	pm_poll 120 lat_all_arrived || note "WARNING: only $(lat_arrived) of $LAT_WANT events reached the listener on B"

	q lb -c "COPY (SELECT id, recv_at FROM lat_recv WHERE id > $first AND id <= $last_id) TO STDOUT" >"$WORK/lat_recv.$label.tsv"
	q la <<-SQL >/dev/null
		CREATE TEMP TABLE r (id bigint, recv_at timestamptz);
		\copy r FROM '$WORK/lat_recv.$label.tsv'
		CREATE TABLE lat_result_$label AS
		SELECT r.id, extract(epoch FROM r.recv_at - pg_xact_commit_timestamp(t.xmin)) * 1000 AS ms
		  FROM r JOIN lat_t t USING (id);
	SQL
	q la -c "COPY (SELECT round(ms::numeric, 3) FROM lat_result_$label ORDER BY ms) TO STDOUT" >"$RESULTS/latency_$label.ms"
	got="$(q la -c "SELECT count(*) FROM lat_result_$label")"
	local p50 p90 p99 p999 mx mean
	read -r p50 p90 p99 p999 mx mean < <(q la -F ' ' -c "
		SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_cont(0.999) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(max(ms)::numeric, 2), round(avg(ms)::numeric, 2)
		  FROM lat_result_$label")
	local prefix=latency
	[[ "$label" != default ]] && prefix="latency_$label"
	fig "${prefix}_events" "$got of $total committed ($(fmt 0 "$(calc "$total / $dur")")/s for ${dur}s)"
	fig "${prefix}_p50_ms" "$p50 (target <= 2)"
	fig "${prefix}_p90_ms" "$p90"
	fig "${prefix}_p99_ms" "$p99 (target <= 10)"
	fig "${prefix}_p999_ms" "$p999"
	fig "${prefix}_max_ms" "$mx"
	fig "${prefix}_mean_ms" "$mean"
}

lat_arrived() {
	q lb -c "SELECT count(DISTINCT id) FROM lat_recv WHERE id > $LAT_FIRST AND id <= $LAT_LAST"
}
lat_all_arrived() { (($(lat_arrived) >= LAT_WANT)); }

# one row at a time until the listener on B has run for one
lat_probe() {
	q la -c 'INSERT INTO lat_t (v) VALUES (0)' >/dev/null
	sleep 0.2
	(($(q lb -c 'SELECT count(*) FROM lat_recv') > 0))
}

bench_latency() {
	local dur
	dur="$(quick 20 5)"
	start_cluster la "fsync = on" "track_commit_timestamp = on"
	start_cluster lb "fsync = on"

	q la <<-'SQL' >/dev/null
		CREATE TABLE lat_t (id bigserial PRIMARY KEY, v int NOT NULL);
		SELECT mqtt_emit.watch('lat_t', model => 'lat');
	SQL
	q lb <<-'SQL' >/dev/null
		CREATE TABLE lat_recv (id bigint NOT NULL, recv_at timestamptz NOT NULL);
		CREATE FUNCTION lat_listener(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
		BEGIN
		    INSERT INTO lat_recv VALUES ((e.result->>'id')::bigint, clock_timestamp());
		END $$;
		SELECT mqtt_emit.listen('lat', 'lat_listener(mqtt_emit.event)'::regprocedure,
		                        allow_remote => true, remote_only => true);
	SQL
	pm_poll 30 lat_subscribed || pm_die "the subscriber of lb did not subscribe"
	cat >"$WORK/lat_insert.sql" <<-'SQL'
		\set v random(1, 1000000)
		INSERT INTO lat_t (v) VALUES (:v);
	SQL

	# warm up: the subscription is live, both workers and the listener's plan are warm
	pm_poll 60 lat_probe || pm_die "no event reached the listener on lb"
	LAT_FIRST="$(q la -c 'SELECT max(id) FROM lat_t')"
	q la -c 'INSERT INTO lat_t (v) SELECT g FROM generate_series(1, 100) g' >/dev/null
	LAT_LAST="$(q la -c 'SELECT max(id) FROM lat_t')" LAT_WANT=100
	pm_poll 60 lat_all_arrived || pm_die "warm-up events did not reach the listener on lb"

	lat_measure default "-c synchronous_commit=on" "$dur" 1000
	lat_measure synccommit_off "-c synchronous_commit=off" "$dur" 1000
	fig latency_setup "pgbench -R 1000 -c 4 -j 2 -T $dur single-row INSERT on A (fsync=on, track_commit_timestamp=on); listener on B inserts clock_timestamp(); latency = that - pg_xact_commit_timestamp"
	stop_cluster la
	stop_cluster lb
}

lat_subscribed() {
	[[ "$(q lb -c 'SELECT subscriber_connected AND subscriptions > 0 FROM mqtt_emit.stats')" == t ]]
}
