/*
 * Sanitizer reports as records, in the sanitizer flavors.
 *
 * UBSan runs in recover mode with these handlers in place of the sanitizer
 * runtime's own (hidden visibility: the library's calls bind here, not to
 * the preloaded runtime). Each handler records the check kind and the site
 * (file, line, column from the handler data) and returns, so execution goes
 * on with what the machine did and the comparison covers the whole program.
 *
 * ASan reports arrive through its report callback (halt_on_error=0): the
 * report's error line and stack are recorded, and the op it happened in is
 * marked as ended by it: its result is not compared.
 *
 * In the plain flavor nothing calls these.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "kc_runtime.h"

#define KC_HIDDEN __attribute__((visibility("hidden")))
#define SITES_PER_OP 64

/* The UBSan handler ABI: every handler's data starts with the source location. */
struct kc_ubsan_location {
	const char *file;
	unsigned int line;
	unsigned int column;
};
struct kc_ubsan_type {
	unsigned short kind, info;
	char name[];
};
struct kc_ubsan_type_mismatch {
	struct kc_ubsan_location loc;
	const struct kc_ubsan_type *type;
	unsigned char log_alignment;
	unsigned char check_kind;
};
struct kc_ubsan_typed {
	struct kc_ubsan_location loc;
	const struct kc_ubsan_type *type;
};

static const void *reported[SITES_PER_OP];
static unsigned int nreported, reported_op = ~0u;

/* One record per site and op: a loop that hits the same check a million
 * times says no more than once. */
static int first_in_op(const void *site)
{
	if (reported_op != kc_cur_op) {
		reported_op = kc_cur_op;
		nreported = 0;
	}
	for (unsigned int i = 0; i < nreported; i++)
		if (reported[i] == site)
			return 0;
	if (nreported == SITES_PER_OP)
		return 0;
	reported[nreported++] = site;
	return 1;
}

/* The handler's caller is the code with the undefined behaviour: its
 * address names the function where the source location is not the KHO
 * file (the shims' inline helpers). */
#define report(data, kind, detail) report_at(__builtin_return_address(0), (data), (kind), (detail))

static void report_at(void *pc, const void *data, const char *kind, const char *detail)
{
	const struct kc_ubsan_location *loc = data;

	if (!first_in_op(data))
		return;
	kc_record(KC_REC_SANITIZER,
		  kc_text("%s\t%s\t%u\t%u\t%s", kind, loc->file ? loc->file : "?", loc->line, loc->column, detail), 0,
		  kc_code_offset(pc));
}

static const char *type_name(const struct kc_ubsan_type *t)
{
	return t ? t->name : "?";
}

static const char *const access_kinds[] = { "load of", "store to", "reference binding to", "member access within",
					    "member call on", "constructor call on", "downcast of", "downcast of",
					    "upcast of", "cast to virtual base of", "_Nonnull binding to",
					    "dynamic operation on" };

KC_HIDDEN void __ubsan_handle_type_mismatch_v1(struct kc_ubsan_type_mismatch *d, unsigned long ptr)
{
	char detail[192];
	const char *access = d->check_kind < sizeof(access_kinds) / sizeof(*access_kinds) ?
				     access_kinds[d->check_kind] : "access to";
	const char *kind = !ptr ? "null-pointer-use" :
			   (ptr & ((1UL << d->log_alignment) - 1)) ? "misaligned-access" : "object-size";

	snprintf(detail, sizeof(detail), "%s type %s", access, type_name(d->type));
	report(d, kind, detail);
}

#define KC_UBSAN_TYPED(handler, kind, ...)                                          \
	KC_HIDDEN void __ubsan_handle_##handler(struct kc_ubsan_typed *d, ##__VA_ARGS__) \
	{                                                                            \
		report(d, kind, type_name(d->type));                                 \
	}
KC_UBSAN_TYPED(shift_out_of_bounds, "shift-out-of-bounds", unsigned long lhs, unsigned long rhs)
KC_UBSAN_TYPED(add_overflow, "signed-integer-overflow", unsigned long lhs, unsigned long rhs)
KC_UBSAN_TYPED(sub_overflow, "signed-integer-overflow", unsigned long lhs, unsigned long rhs)
KC_UBSAN_TYPED(mul_overflow, "signed-integer-overflow", unsigned long lhs, unsigned long rhs)
KC_UBSAN_TYPED(negate_overflow, "signed-integer-overflow", unsigned long value)
KC_UBSAN_TYPED(divrem_overflow, "division-overflow", unsigned long lhs, unsigned long rhs)
KC_UBSAN_TYPED(out_of_bounds, "array-index-out-of-bounds", unsigned long index)
KC_UBSAN_TYPED(load_invalid_value, "invalid-value-load", unsigned long value)
KC_UBSAN_TYPED(vla_bound_not_positive, "vla-bound-not-positive", unsigned long bound)
KC_UBSAN_TYPED(float_cast_overflow, "float-cast-overflow", unsigned long from)

KC_HIDDEN void __ubsan_handle_pointer_overflow(struct kc_ubsan_location *d, unsigned long base, unsigned long result)
{
	report(d, "pointer-overflow", "");
}

KC_HIDDEN void __ubsan_handle_invalid_builtin(struct kc_ubsan_location *d)
{
	report(d, "invalid-builtin-use", "");
}

KC_HIDDEN void __ubsan_handle_nonnull_arg(struct kc_ubsan_location *d)
{
	report(d, "nonnull-attribute", "");
}

/* Not recoverable: nothing sensible follows reaching unreachable code. */
KC_HIDDEN void __ubsan_handle_builtin_unreachable(struct kc_ubsan_location *d)
{
	report(d, "unreachable", "");
	kc_bug("__builtin_unreachable", (int)d->line, "unreachable code reached");
}

#ifdef KC_ASAN
void __asan_set_error_report_callback(void (*callback)(const char *));

/* "ERROR: AddressSanitizer: <kind> on address ..." then the stack: record
 * the kind, and the stack's frames, one per line. */
static void on_asan_report(const char *text)
{
	const char *error = strstr(text, "AddressSanitizer: ");
	char kind[96] = "asan", frames[1024] = "";
	size_t used = 0;

	if (error)
		sscanf(error + strlen("AddressSanitizer: "), "%80s", kind + snprintf(kind, sizeof(kind), "asan:"));
	for (const char *p = strstr(text, "    #"); p && used < sizeof(frames) - 1; p = strstr(p + 1, "\n    #")) {
		const char *line = p[0] == '\n' ? p + 1 : p;
		size_t n = strcspn(line, "\n");

		used += snprintf(frames + used, sizeof(frames) - used, "%.*s|", (int)n, line + 4);
	}
	kc_record(KC_REC_SANITIZER, kc_text("%s\t?\t0\t0\t%s", kind, frames), 1, 0);
}

/* ASan has one report callback per process: the library about to run
 * takes it, so that with two kernel libraries loaded (a handover across
 * versions) each report lands in the records of the library it came from. */
void kc_sanitizer_attach(void)
{
	__asan_set_error_report_callback(on_asan_report);
}
#else
void kc_sanitizer_attach(void)
{
}
#endif
