# bench/lib/subscribe.sh: how long subscriptions take to be live.
#
# On a fresh cluster "s" (no remote listener yet; the subscriber client is
# made and connected at worker start all the same):
#  - subscribe_first_listen_to_suback_ms: the cluster's first
#    listen(allow_remote => true): commit -> the broker's SUBACK (the view's
#    "since" of the acknowledged filter).
#  - subscribe_listen_to_suback_ms: median (and max) over ROUNDS listen()
#    calls on new models while the subscriber is connected: commit -> SUBACK.
#  - subscribe_worker_start_to_ready_ms: the cluster restarted with those
#    listeners: the worker's backend_start -> both clients ready (publisher
#    connected, every subscription acknowledged). The subscriber's part is
#    exact (the latest "since"); the publisher's is when a loop in SQL that
#    polls mqtt_emit.stats every millisecond first saw it connected (it can
#    only be later than the truth, and the loop starts once a session can
#    connect). subscribe_worker_start_to_subscribed_ms is the subscriber part
#    alone.
#
# "commit" is clock_timestamp() in the committing session right after the
# COMMIT returned; "since" is taken by the worker when it handles the SUBACK.

sub_ack_wait() {
	local filter_like="$1"
	[[ "$(q s -c "SELECT count(*) > 0 AND bool_and(state = 'acknowledged') FROM mqtt_emit.subscriptions WHERE topic_filter LIKE '$filter_like'")" == t ]]
}

# sub_listen MODEL: commit a remote listener on MODEL, print the ms from
# the commit to the SUBACK of its filter
sub_listen() {
	local model="$1" t1
	# two -c: each its own transaction, so the second runs after the commit
	t1="$(q s -c "SELECT mqtt_emit.listen('$model', 'sub_l(mqtt_emit.event)', allow_remote => true) IS NULL" \
		-c "SELECT clock_timestamp()" | tail -n1)"
	pm_poll 60 sub_ack_wait "%/$model/#" || { echo NA; return; }
	q s -c "SELECT round(extract(epoch FROM (max(since) - '$t1'::timestamptz)) * 1000, 1)
	          FROM mqtt_emit.subscriptions WHERE topic_filter LIKE '%/$model/#'"
}

bench_subscribe() {
	local rounds i v vals=() first
	rounds="$(quick 20 5)"
	start_cluster s
	q s <<-'SQL' >/dev/null
		CREATE FUNCTION sub_l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
	SQL

	first="$(sub_listen m0)"
	fig subscribe_first_listen_to_suback_ms "$first (the cluster's first remote listener)"
	for ((i = 1; i <= rounds; i++)); do
		v="$(sub_listen "m$i")"
		vals+=("$v")
		printf 'listen_to_suback\t%s\t%s\n' "$i" "$v" >>"$RESULTS/subscribe.tsv"
	done
	fig subscribe_listen_to_suback_ms "$(printf '%s\n' "${vals[@]}" | median) median of $rounds, max $(printf '%s\n' "${vals[@]}" | grep -v NA | sort -g | tail -n1) (subscriber connected)"

	# restart: both clients are made at worker start
	"$PG_BINDIR/pg_ctl" -D "${CL_DATA[s]}" -l "$WORK/s/postgresql.log" -m fast -w -t 120 restart >/dev/null ||
		pm_die "cluster s did not restart"
	local out
	out="$(q s 2>&1 <<-'SQL'
		DO $$
		DECLARE
		    pub timestamptz;
		    subs timestamptz;
		    start timestamptz;
		BEGIN
		    FOR i IN 1 .. 60000 LOOP
		        PERFORM pg_stat_clear_snapshot();
		        IF pub IS NULL AND (SELECT connected FROM mqtt_emit.stats) THEN
		            pub := clock_timestamp();
		        END IF;
		        SELECT CASE WHEN count(*) > 0 AND bool_and(state = 'acknowledged') THEN max(since) END
		          INTO subs FROM mqtt_emit.subscriptions;
		        EXIT WHEN pub IS NOT NULL AND subs IS NOT NULL;
		        PERFORM pg_sleep(0.001);
		    END LOOP;
		    SELECT backend_start INTO start FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit';
		    RAISE NOTICE 'ready % %',
		        round(extract(epoch FROM (greatest(pub, subs) - start)) * 1000, 1),
		        round(extract(epoch FROM (subs - start)) * 1000, 1);
		END $$;
	SQL
	)" || true
	local both subd
	both="$(sed -n 's/.*NOTICE:  ready \([0-9.]*\) \([0-9.]*\).*/\1/p' <<<"$out")"
	subd="$(sed -n 's/.*NOTICE:  ready \([0-9.]*\) \([0-9.]*\).*/\2/p' <<<"$out")"
	fig subscribe_worker_start_to_ready_ms "${both:-NA} (publisher connected and $((rounds + 1)) filters acknowledged)"
	fig subscribe_worker_start_to_subscribed_ms "${subd:-NA}"
	stop_cluster s
}
