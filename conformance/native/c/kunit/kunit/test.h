/*
 * A minimal userspace <kunit/test.h>: enough of KUnit for the reproducers
 * `kho-conform export kunit` writes to compile and run here, built into the
 * extracted kernel unit as they are built into kexec_handover.c in a kernel.
 *
 * Expectations record a failure and go on; assertions record it and return
 * from the test case (KUnit aborts the case; the generated tests only assert
 * in the case function itself). kunit_skip() marks the case skipped and
 * returns. Results are printed as KTAP by kc_kunit_main.c.
 */
#ifndef KC_KUNIT_TEST_H
#define KC_KUNIT_TEST_H

struct kunit {
	const char *name;
	int failures;
	int skipped;
	char skip_reason[128];
};

struct kunit_case {
	void (*run_case)(struct kunit *test);
	const char *name;
};

struct kunit_suite {
	const char name[256];
	int (*init)(struct kunit *test);
	void (*exit)(struct kunit *test);
	struct kunit_case *test_cases;
};

#define KUNIT_CASE(test_name) { .run_case = test_name, .name = #test_name }

#define KC_KUNIT_CAT2(a, b) a##b
#define KC_KUNIT_CAT(a, b) KC_KUNIT_CAT2(a, b)
/* Suites land in one section; the runner walks it (__start_/__stop_). */
#define kunit_test_suites(...)							\
	static struct kunit_suite *KC_KUNIT_CAT(kc_kunit_suites_, __COUNTER__)[]	\
	__attribute__((used, section("kc_kunit_suites"), aligned(sizeof(void *)))) = { __VA_ARGS__ }
#define kunit_test_suite(suite) kunit_test_suites(&suite)

void kc_kunit_fail(struct kunit *test, const char *file, int line, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void kc_kunit_more(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kc_kunit_note(struct kunit *test, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kc_kunit_skip(struct kunit *test, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define kunit_info(test, fmt, ...) kc_kunit_note(test, fmt, ##__VA_ARGS__)
#define kunit_err(test, fmt, ...) kc_kunit_note(test, fmt, ##__VA_ARGS__)
#define kunit_skip(test, fmt, ...) do { kc_kunit_skip(test, fmt, ##__VA_ARGS__); return; } while (0)

/* Integer comparisons, values shown in decimal and hex as KUnit does. */
#define KC_KUNIT_BINARY(test, fatal, left, op, right, fmt, ...)			\
	do {									\
		const long long __left = (long long)(left);			\
		const long long __right = (long long)(right);			\
		if (!(__left op __right)) {					\
			kc_kunit_fail(test, __FILE__, __LINE__,			\
				      "Expected %s %s %s, but\n    %s == %lld (0x%llx)\n    %s == %lld (0x%llx)", \
				      #left, #op, #right, #left, __left, (unsigned long long)__left, \
				      #right, __right, (unsigned long long)__right);	\
			kc_kunit_more("" fmt, ##__VA_ARGS__);			\
			if (fatal)						\
				return;						\
		}								\
	} while (0)
#define KC_KUNIT_TRUE(test, fatal, cond, fmt, ...)				\
	do {									\
		if (!(cond)) {							\
			kc_kunit_fail(test, __FILE__, __LINE__, "Expected %s to be true", #cond); \
			kc_kunit_more("" fmt, ##__VA_ARGS__);			\
			if (fatal)						\
				return;						\
		}								\
	} while (0)

#define KUNIT_EXPECT_EQ(test, l, r) KC_KUNIT_BINARY(test, 0, l, ==, r, "")
#define KUNIT_EXPECT_NE(test, l, r) KC_KUNIT_BINARY(test, 0, l, !=, r, "")
#define KUNIT_EXPECT_LT(test, l, r) KC_KUNIT_BINARY(test, 0, l, <, r, "")
#define KUNIT_EXPECT_GE(test, l, r) KC_KUNIT_BINARY(test, 0, l, >=, r, "")
#define KUNIT_EXPECT_EQ_MSG(test, l, r, fmt, ...) KC_KUNIT_BINARY(test, 0, l, ==, r, fmt, ##__VA_ARGS__)
#define KUNIT_EXPECT_LT_MSG(test, l, r, fmt, ...) KC_KUNIT_BINARY(test, 0, l, <, r, fmt, ##__VA_ARGS__)
#define KUNIT_EXPECT_GE_MSG(test, l, r, fmt, ...) KC_KUNIT_BINARY(test, 0, l, >=, r, fmt, ##__VA_ARGS__)
#define KUNIT_EXPECT_TRUE(test, c) KC_KUNIT_TRUE(test, 0, c, "")
#define KUNIT_EXPECT_FALSE(test, c) KC_KUNIT_TRUE(test, 0, !(c), "")
#define KUNIT_EXPECT_TRUE_MSG(test, c, fmt, ...) KC_KUNIT_TRUE(test, 0, c, fmt, ##__VA_ARGS__)
#define KUNIT_EXPECT_NOT_NULL(test, p) KC_KUNIT_TRUE(test, 0, (p) != NULL, "")
#define KUNIT_ASSERT_EQ(test, l, r) KC_KUNIT_BINARY(test, 1, l, ==, r, "")
#define KUNIT_ASSERT_TRUE(test, c) KC_KUNIT_TRUE(test, 1, c, "")
#define KUNIT_ASSERT_NOT_NULL(test, p) KC_KUNIT_TRUE(test, 1, (p) != NULL, "")
#define KUNIT_FAIL(test, fmt, ...) kc_kunit_fail(test, __FILE__, __LINE__, fmt, ##__VA_ARGS__)

#endif
