/*
 * The userspace stand-in for the kernel's environment: physical memory, page
 * allocator, struct page store, memblock recorder, warnings and printk.
 *
 * Plain C types only: this header is included both by the kernel translation
 * unit (built -nostdinc against the shims) and by kc_runtime.c (built against
 * libc), so it must not depend on either side's typedefs.
 */
#ifndef KC_RUNTIME_H
#define KC_RUNTIME_H

#include "kc_contract.h"

/* Built with AddressSanitizer (clang says so by feature, gcc by macro). */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KC_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) && !defined(KC_ASAN)
#define KC_ASAN 1
#endif

/* The kernel's struct page, reduced to what KHO touches. */
struct page {
	unsigned long flags;
	unsigned long private;
	unsigned int kc_order;     /* compound order of a head page */
	unsigned long kc_pfn;      /* pfn of a detached page (made by the driver) */
};
struct folio {
	struct page page;
};

/* The kernel's struct vm_struct, reduced to what KHO touches. */
struct vm_struct {
	void *addr;
	unsigned long size;
	unsigned long flags;
	struct page **pages;
	unsigned int page_order;
	unsigned int nr_pages;
};

/* physical memory: a direct map in which only the arena is backed */
void *kc_phys_to_virt(unsigned long long phys);
unsigned long long kc_virt_to_phys(const volatile void *virt);

/* memmap */
struct page *kc_pfn_to_page(unsigned long pfn);
unsigned long kc_page_to_pfn(const struct page *page);
struct page *kc_pfn_to_online_page(unsigned long pfn);
struct page *kc_caller_page(unsigned long pfn, unsigned int order); /* a folio the caller owns */
int kc_page_count(const struct page *page);
void kc_set_page_count(const struct page *page, int count);
int kc_pfn_to_nid(unsigned long pfn);

/* page allocator: lowest free naturally aligned block, fault injection */
void *kc_alloc_pages(unsigned int order);
void kc_free_pages(const void *addr);
void kc_put_page(struct page *page);
int kc_slab_is_available(void);
void kc_adjust_managed(long pages);
long kc_managed_pages(void);
void kc_set_slab_ready(int ready);

/* vmalloc: areas in a fake address space, pages arrays in host memory */
struct vm_struct *kc_find_vm_area(const void *addr);
/* The caller's area of nr_pages pages from pfn (RAM), mapped in 2^order blocks. */
void *kc_make_vm_area(unsigned long pfn, unsigned int nr_pages, unsigned int order, unsigned long flags);
struct vm_struct *kc_get_vm_area(unsigned long size, unsigned int shift, unsigned long flags);
int kc_vmap_pages(unsigned long addr, unsigned long end, struct page **pages, unsigned int shift);
void kc_free_vm_area(struct vm_struct *area);
void *kc_kvmalloc_array(unsigned long n, unsigned long size);
void kc_kvfree(const void *p);

/* memblock recorder */
void kc_memblock_record(int kind, unsigned long long base, unsigned long long size);
unsigned long long kc_memblock_end_of_dram(void);

/* warnings and log */
int kc_warn(int cond, int site, int once, const char *func, int line, const char *text);
void kc_printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kc_bug(const char *func, int line, const char *text) __attribute__((noreturn));

/* kernel string helpers without a libc equivalent */
long kc_strscpy(char *d, const char *s, unsigned long n);

/* ---- between the driver (in the kernel unit) and the runtime ---- */

/* What a run reports (kc_contract.h): each op's answer (struct kc_answer),
 * the frequent records in streams of words (enum kc_stream), the others in
 * an append-only list (struct kc_rec, enum kc_rec_kind). */
extern unsigned int kc_cur_op;
void kc_answer(long rc, unsigned long long value, unsigned long long value2);
void kc_stream_pair(enum kc_stream s, unsigned long long a, unsigned long long b);
void kc_stream_word(enum kc_stream s, unsigned long long a);
void kc_record(unsigned int kind, unsigned long long a, unsigned long long b, unsigned long long c);
unsigned long long kc_text(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Offset of a code address in this library, for symbolizing in Python. */
unsigned long long kc_code_offset(void *pc);
/* Route sanitizer reports into this library's records; called before each run (kc_sanitizer.c). */
void kc_sanitizer_attach(void);

struct kc_header;
/* Reset all runtime state for a new program of nsteps steps; non-zero for a bad header. */
int kc_setup(const struct kc_header *h, unsigned long nsteps);
/* Start a kernel: old (0) or next (1). Resets struct pages and warn-once. */
void kc_start_kernel(int next);
int kc_is_ram(unsigned long pfn);
void *kc_arena_page(unsigned long index);
unsigned long kc_arena_pages(void);
unsigned long kc_arena_hwm(void); /* one past the highest page ever allocated or written */
/* Keep [first, first + n) arena pages allocated: the handed-over image. */
void kc_arena_reserve(unsigned long first, unsigned long n);
/* A page was written outside the allocator (a poke): the snapshot covers it. */
void kc_arena_written(unsigned long index);
/* Copy the arena's written pages aside: the old kernel's memory at kexec. */
void kc_snapshot(void);
/* Run fn(arg) so that a fault or a runaway loop ends it with a recorded
 * event instead of killing the process; non-zero if it was ended. */
int kc_protected(void (*fn)(void *), void *arg);
/* Give the op about to run its own CPU budget. */
void kc_op_budget(void);

#endif
