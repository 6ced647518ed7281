# pg_mqtt_emit/Makefile

MODULE_big = pg_mqtt_emit
OBJS = \
	src/pg_mqtt_emit.o \
	src/shmem.o \
	src/pubprops.o \
	src/capture.o \
	src/pending.o \
	src/payload.o \
	src/worker.o \
	src/launcher.o \
	src/client.o \
	src/inflight.o \
	src/relay.o \
	src/outbox.o \
	src/inbound.o \
	src/topic.o \
	src/broker.o \
	src/broker_callbacks.o \
	src/listeners.o \
	src/handlers.o \
	src/rowsec.o \
	src/listener_stats.o \
	src/remote.o \
	src/listener_worker.o \
	src/sql_api.o \
	src/spool.o

EXTENSION = pg_mqtt_emit
DATA = $(wildcard pg_mqtt_emit--*.sql)
PGFILEDESC = "pg_mqtt_emit - row changes as MQTT events"

REGRESS = setup watch capture columns listen outbox monitoring drop
# make installcheck works on its own: temp instances with the library
# preloaded, and a mosquitto that REGRESS_PREP starts on a free port (and
# stops when make exits). Run it as an ordinary user (initdb refuses root).
REGRESS_BROKER_DIR = $(CURDIR)/tmp_broker
REGRESS_PREP = regress-broker
REGRESS_OPTS = --temp-config=test/regress.conf --temp-config=$(REGRESS_BROKER_DIR)/broker.conf --temp-instance=./tmp_check
ISOLATION = commit_order
ISOLATION_OPTS = --temp-config=test/regress.conf --temp-config=test/isolation.conf --temp-config=$(REGRESS_BROKER_DIR)/broker.conf --temp-instance=./tmp_check_iso

SHLIB_LINK += -lpaho-mqtt3as -lpthread
EXTRA_CLEAN = tmp_check tmp_check_iso tmp_broker results output_iso regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

$(OBJS): src/pg_mqtt_emit.h src/compat.h
src/worker.o src/client.o src/inflight.o src/relay.o src/inbound.o src/broker.o src/broker_callbacks.o: src/broker.h src/worker.h
src/broker.o src/broker_callbacks.o: src/broker_int.h
src/listeners.o src/rowsec.o: src/rowsec.h
src/worker.o src/relay.o src/inbound.o src/listeners.o src/remote.o src/listener_worker.o: src/listeners.h
src/capture.o src/pending.o src/outbox.o src/relay.o src/inflight.o src/worker.o src/inbound.o src/listener_worker.o: src/outbox.h
src/topic.o src/outbox.o src/relay.o src/inflight.o src/inbound.o src/listeners.o src/remote.o src/handlers.o src/listener_worker.o src/sql_api.o: src/topic.h
src/pubprops.o src/sql_api.o src/inflight.o src/outbox.o src/broker.o: src/pubprops.h

.PHONY: regress-broker
regress-broker:
	@bash test/regress-broker.sh '$(REGRESS_BROKER_DIR)' $$PPID
src/spool.o src/inbound.o src/worker.o src/broker_callbacks.o: src/spool.h src/broker.h
