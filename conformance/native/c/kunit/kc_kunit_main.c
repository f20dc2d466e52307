/*
 * The KUnit runner of the userspace build of a generated reproducer: included
 * at the end of the extracted kexec_handover.c, after the driver and the
 * test file. It boots KHO's old kernel as the driver does (kho_init on an
 * arena of pages, no ops), runs every suite's cases, each under the
 * runtime's fault containment, and prints KTAP. Exit status: 0 when every
 * case passed or was skipped, 1 when one failed, 2 when KHO did not come up.
 */
int printf(const char *fmt, ...);
int vprintf(const char *fmt, __builtin_va_list ap);
int vsnprintf(char *buf, unsigned long size, const char *fmt, __builtin_va_list ap);
int fflush(void *stream);

#define KC_KUNIT_ARENA_PAGES 4096 /* room for a test block of 2^MAX_PAGE_ORDER pages, aligned */

extern struct kunit_suite *__start_kc_kunit_suites[];
extern struct kunit_suite *__stop_kc_kunit_suites[];

void kc_kunit_fail(struct kunit *test, const char *file, int line, const char *fmt, ...)
{
	__builtin_va_list ap;

	test->failures++;
	printf("    # %s: EXPECTATION FAILED at %s:%d\n    ", test->name, file, line);
	__builtin_va_start(ap, fmt);
	vprintf(fmt, ap);
	__builtin_va_end(ap);
	printf("\n");
}

/* The message an expectation's _MSG form adds, under its failure. */
void kc_kunit_more(const char *fmt, ...)
{
	__builtin_va_list ap;

	if (!*fmt)
		return;
	printf("    ");
	__builtin_va_start(ap, fmt);
	vprintf(fmt, ap);
	__builtin_va_end(ap);
	printf("\n");
}

void kc_kunit_note(struct kunit *test, const char *fmt, ...)
{
	__builtin_va_list ap;

	printf("    # %s: ", test->name);
	__builtin_va_start(ap, fmt);
	vprintf(fmt, ap);
	__builtin_va_end(ap);
	printf("\n");
}

void kc_kunit_skip(struct kunit *test, const char *fmt, ...)
{
	__builtin_va_list ap;

	test->skipped = 1;
	__builtin_va_start(ap, fmt);
	vsnprintf(test->skip_reason, sizeof(test->skip_reason), fmt, ap);
	__builtin_va_end(ap);
}

struct kc_kunit_run {
	struct kunit_case *test_case;
	struct kunit *test;
};

static void kc_kunit_case(void *arg)
{
	struct kc_kunit_run *run = arg;

	run->test_case->run_case(run->test);
}

static int kc_kunit_suite(int index, struct kunit_suite *suite)
{
	int n = 0, failed = 0;

	while (suite->test_cases[n].run_case)
		n++;
	printf("    KTAP version 1\n    # Subtest: %s\n    1..%d\n", suite->name, n);
	for (int i = 0; i < n; i++) {
		struct kunit test = { .name = suite->test_cases[i].name };
		struct kc_kunit_run run = { &suite->test_cases[i], &test };

		if (suite->init && suite->init(&test))
			test.failures++;
		else if (kc_protected(kc_kunit_case, &run))
			kc_kunit_fail(&test, __FILE__, __LINE__, "ended by a fault or its CPU budget");
		if (suite->exit)
			suite->exit(&test);
		if (test.failures)
			printf("    not ok %d %s\n", i + 1, test.name);
		else if (test.skipped)
			printf("    ok %d %s # SKIP %s\n", i + 1, test.name, test.skip_reason);
		else
			printf("    ok %d %s\n", i + 1, test.name);
		failed |= !!test.failures;
		fflush(0);
	}
	printf("%sok %d %s\n", failed ? "not " : "", index, suite->name);
	return failed;
}

int main(void)
{
	struct kc_header h = { 0 };
	int failed = 0, n = __stop_kc_kunit_suites - __start_kc_kunit_suites;

	h.page_shift = PAGE_SHIFT;
	h.n_ram = 1;
	h.ram[0].b = 1ULL << 20; /* pfns 0..2^20 are RAM, as in a program's default header */
	h.n_numa = 1;
	h.arena_pages = KC_KUNIT_ARENA_PAGES;
	printf("KTAP version 1\n1..%d\n", n);
	if (kc_run(&h, sizeof(h), NULL, 0) || !kho_is_enabled()) {
		printf("Bail out! KHO did not come up\n");
		return 2;
	}
	for (int i = 0; i < n; i++)
		failed |= kc_kunit_suite(i + 1, __start_kc_kunit_suites[i]);
	fflush(0);
	return failed;
}
