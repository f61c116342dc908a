# connectd: one GNU Makefile. Variants build into build/<variant>/:
#   release  -O2, fortify, PIE           (make, make release)
#   asan     ASan + UBSan, used by tests (make asan)
#   fuzz     clang, libFuzzer + ASan + UBSan (make fuzz)
# make check runs unit tests, then the integration suite against a real Consul agent.

PKGS      := openssl libcurl jansson libnghttp2 libpcre2-8
CC        ?= cc
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null)

WARN   := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wvla
ifeq ($(CI),true)
WARN   += -Werror
endif
BASE_CFLAGS := -std=c11 -D_GNU_SOURCE -g -pthread $(WARN) $(PKG_CFLAGS) $(CFLAGS)
BASE_LDFLAGS := -pthread $(LDFLAGS)

VARIANT ?= release
ifeq ($(VARIANT),release)
V_CFLAGS  := -O2 -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fPIE
V_LDFLAGS := -pie -Wl,-z,relro,-z,now
else ifeq ($(VARIANT),asan)
V_CFLAGS  := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=undefined,float-cast-overflow
V_LDFLAGS := -fsanitize=address,undefined,float-cast-overflow
else ifeq ($(VARIANT),fuzz)
CC        := clang
V_CFLAGS  := -O1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined \
             -fno-sanitize-recover=undefined
V_LDFLAGS := -fsanitize=fuzzer,address,undefined
else
$(error unknown VARIANT $(VARIANT))
endif

B        := build/$(VARIANT)
SRCS     := $(wildcard src/*.c)
OBJS     := $(SRCS:src/%.c=$(B)/obj/%.o)
LIBOBJS  := $(filter-out $(B)/obj/main.o,$(OBJS))
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(B)/tests/%)


.PHONY: test-tools
.PHONY: all release asan unit check integ deps lint format demo clean install consul doc doc-check \
	bench bench-tools fuzz fuzz-build fuzz-run soak

all: $(B)/connectd

release:
	$(MAKE) VARIANT=release all
asan:
	$(MAKE) VARIANT=asan all

$(B)/obj/%.o: src/%.c
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(V_CFLAGS) -MMD -MP -c -o $@ $<

# The export lets GnuTLS, which libcurl's dependencies load, find main.c's
# _gnutls_global_init_skip (see there).
$(B)/connectd: $(OBJS)
	$(CC) $(BASE_LDFLAGS) $(V_LDFLAGS) -Wl,--export-dynamic-symbol=_gnutls_global_init_skip \
		-o $@ $^ $(PKG_LIBS)

$(B)/tests/%: tests/unit/%.c $(LIBOBJS)
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(V_CFLAGS) -Isrc -o $@ $< $(LIBOBJS) $(BASE_LDFLAGS) $(V_LDFLAGS) \
		$(PKG_LIBS) $(CMOCKA_LIBS)

-include $(OBJS:.o=.d)

# Test programs that are not cmocka suites: h1parse_dump feeds tests/integ/test_h1parse_diff.py,
# h2_peer (the HTTP/2 codec on a socket) tests/integ/test_h2_interop.py.
TEST_TOOLS := $(B)/tests/h1parse_dump $(B)/tests/h2_peer
test-tools: $(TEST_TOOLS)

# Unit tests (cmocka), under the sanitizers.
unit:
	@$(MAKE) --no-print-directory VARIANT=asan unit-run
unit-run: $(UNIT_BINS)
	@rc=0; for t in $(UNIT_BINS); do echo "== $$t"; $$t || rc=1; done; exit $$rc

# libFuzzer targets (tests/fuzz/fuzz_*.c), built with clang into build/fuzz/. make fuzz runs
# each for FUZZ_SECONDS (default 60) on a scratch copy of its committed corpus, so new inputs
# land in build/fuzz/corpus/ and crashes in build/fuzz/artifacts/; add a crash's input to
# tests/fuzz/corpus/<target>/ once it is fixed. Needs clang and its libFuzzer runtime
# (scripts/deps fuzz installs them).
FUZZ_SECONDS ?= 60
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS := $(FUZZ_SRCS:tests/fuzz/%.c=$(B)/%)

$(B)/fuzz_%: tests/fuzz/fuzz_%.c $(LIBOBJS)
	$(CC) $(BASE_CFLAGS) $(V_CFLAGS) -Isrc -o $@ $< $(LIBOBJS) $(BASE_LDFLAGS) $(V_LDFLAGS) \
		$(PKG_LIBS)

fuzz:
	@scripts/deps fuzz-check
	@$(MAKE) --no-print-directory VARIANT=fuzz fuzz-run
fuzz-build: $(FUZZ_BINS)
fuzz-run: fuzz-build
	@rc=0; for t in $(FUZZ_BINS); do n=$${t##*/fuzz_}; \
		mkdir -p $(B)/corpus/$$n $(B)/artifacts; \
		echo "== fuzz_$$n: $(FUZZ_SECONDS) s"; \
		$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
			-print_final_stats=1 -artifact_prefix=$(B)/artifacts/$$n- \
			$(B)/corpus/$$n tests/fuzz/corpus/$$n >$(B)/$$n.log 2>&1; st=$$?; \
		grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|Done)' $(B)/$$n.log; \
		if [ $$st -ne 0 ]; then echo "FAILED fuzz_$$n (exit $$st; see $(B)/$$n.log)"; rc=1; fi; \
		done; exit $$rc

# Integration tests against a real Consul agent (pytest).
integ:
	@$(MAKE) --no-print-directory VARIANT=asan all
	@$(MAKE) --no-print-directory VARIANT=release all
	python3 -m pytest -ra tests/integ $(PYTEST_ARGS)

# Everything: what the README's test command and CI run.
check:
	scripts/test

deps:
	scripts/deps

# doc/config.md and the man page doc/connectd.8 are generated from the flag and key tables in
# the code; doc-check fails when either is stale.
doc: release
	build/release/connectd -config-doc > doc/config.md
	build/release/connectd -man > doc/connectd.8
doc-check: release
	@build/release/connectd -config-doc | diff -u doc/config.md - || \
		{ echo "doc/config.md is stale: run make doc"; exit 1; }
	@build/release/connectd -man | diff -u doc/connectd.8 - || \
		{ echo "doc/connectd.8 is stale: run make doc"; exit 1; }

# The soak (tests/soak/soak.py): the asan build in a mesh under steady L4, HTTP and gRPC
# traffic for SOAK_MINUTES while intentions flip, the CA rotates, instances come and go and
# the agent restarts twice; every byte checked, RSS and descriptors watched. Writes
# build/soak-report.md; fails on any error, sanitizer report or growth.
SOAK_MINUTES ?= 2
soak:
	@$(MAKE) --no-print-directory VARIANT=asan all
	python3 tests/soak/soak.py --minutes $(SOAK_MINUTES)

consul:
	scripts/consul path

demo:
	scripts/demo

# Side-by-side benchmarks (bench/README.md): connectd against consul, haproxy and nginx pairs.
# Always the release build; writes bench/report.md. BENCH_QUICK=1 runs a ~1 minute subset.
bench-tools: $(B)/benchd $(B)/openloop
# benchd answers h2c too (the L7 scenarios), through libnghttp2.
$(B)/benchd: BENCH_LIBS := -lnghttp2
$(B)/benchd $(B)/openloop: $(B)/%: bench/%.c bench/bench.h
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(V_CFLAGS) $(BASE_LDFLAGS) $(V_LDFLAGS) -o $@ $< $(BENCH_LIBS)

bench:
	@$(MAKE) --no-print-directory VARIANT=release all bench-tools
	bench/run

lint:
	clang-format --dry-run --Werror src/*.c src/*.h tests/unit/*.c tests/fuzz/*.c
	clang-tidy --quiet src/*.c -- -std=c11 -D_GNU_SOURCE $(PKG_CFLAGS)
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --inline-suppr \
		--suppress=missingIncludeSystem -D_GNU_SOURCE src
	@! grep -nE '\b(strcpy|strcat|sprintf|strtok|atoi|atol|strncpy|gets)\s*\(' src/*.c || \
		{ echo "banned function used"; exit 1; }
	scripts/layers

format:
	clang-format -i src/*.c src/*.h tests/unit/*.c tests/fuzz/*.c

# make install [PREFIX=/usr/local] [DESTDIR=staging]: the binary, the man page and the example
# systemd unit (its ExecStart names $(PREFIX)/bin/connectd).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
install: release
	install -D -m 0755 build/release/connectd $(DESTDIR)$(BINDIR)/connectd
	install -D -m 0644 doc/connectd.8 $(DESTDIR)$(MANDIR)/man8/connectd.8
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|/usr/bin/connectd|$(BINDIR)/connectd|' contrib/connectd@.service \
		> $(DESTDIR)$(UNITDIR)/connectd@.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/connectd@.service

clean:
	rm -rf build
