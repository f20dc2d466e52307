/*
 * The kernel's environment in userspace: a physical memory arena behind a
 * direct map, a deterministic page allocator with fault injection, a sparse
 * struct page store, memblock and warning recorders, and fault containment.
 *
 * Built against libc (unlike the kernel unit); shares only kc_runtime.h and
 * the generated kc_contract.h with it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>

#include "kc_contract.h"
#include "kc_runtime.h"

#ifndef KC_PAGE_SHIFT
#error "build with -DKC_PAGE_SHIFT"
#endif
#define PG_SIZE (1UL << KC_PAGE_SHIFT)
/* Physical addresses [0, DIRECT_MAP_BYTES) have a virtual address; only the
 * arena is backed, the rest faults and is reported. Pages above it get one of
 * HIGH_SLOTS inaccessible trap pages, so that any address stays a number the
 * kernel can store and read back, and never reaches host memory. */
#define DIRECT_MAP_BYTES (1ULL << 40)
#define HIGH_SLOTS 4096
#define WARN_SITES 4096

static unsigned long kc_page_offset; /* host address of phys 0 */
static unsigned char *high_map;
static unsigned long long high_phys[HIGH_SLOTS];
static unsigned int high_used;
unsigned int kc_cur_op;

static unsigned char *direct_map;
static struct page *memmap; /* one struct page per pfn below KC_MAX_RAM_PFN */
static unsigned long memmap_lo = ~0UL, memmap_hi; /* touched span, for reset */
static struct kc_header hdr;
static unsigned long arena_first_pfn, arena_mapped;
static int shortcuts = 1; /* KHO_CONFORM_SHORTCUTS=0 in the environment: off */
static unsigned char *arena_order;  /* per arena page: order + 1 at a block head, 0 free */
static unsigned char *arena_used;
static unsigned long arena_hint = 1;
/* The high-water mark: one past the highest page written, allocated or poked
 * (the old kernel's memory, which the next kernel must not reuse). */
static unsigned long arena_hwm = 1;
static unsigned long long alloc_count;
static int fault_armed, slab_ready, memory_init;
static long managed_pages;
static unsigned char warn_once_fired[WARN_SITES];
static unsigned int warn_op = ~0u, warns_this_op; /* WARN_CAP per op */
static struct page sink_page;

static struct kc_rec *recs;
static unsigned long nrecs, cap_recs;
static struct kc_answer *answers; /* one per step of the program */
static unsigned long nanswers, cap_answers;
static struct {
	kc_u64 *words;
	unsigned long n, cap;
} streams[KC_NSTREAMS];
static char *text;
static unsigned long ntext, cap_text;
static unsigned char *snapshot;
static unsigned long snapshot_pages;

static sigjmp_buf protect_env;
static volatile sig_atomic_t protecting;
static volatile unsigned long long fault_addr;
static void *volatile fault_pc;
static volatile int fault_signal;

static void *grow(void *p, unsigned long *cap, unsigned long need, size_t elem)
{
	if (need <= *cap)
		return p;
	while (*cap < need)
		*cap = *cap ? *cap * 2 : 1024;
	p = realloc(p, *cap * elem);
	if (!p) {
		fputs("kho-conform runtime: out of memory\n", stderr);
		abort();
	}
	return p;
}

void kc_record(unsigned int kind, unsigned long long a, unsigned long long b, unsigned long long c)
{
	recs = grow(recs, &cap_recs, nrecs + 1, sizeof(*recs));
	recs[nrecs++] = (struct kc_rec){ kind, kc_cur_op, a, b, c };
}

void kc_answer(long rc, unsigned long long value, unsigned long long value2)
{
	if (kc_cur_op < nanswers)
		answers[kc_cur_op] = (struct kc_answer){ (kc_u64)rc, value, value2 };
}

void kc_stream_pair(enum kc_stream s, unsigned long long a, unsigned long long b)
{
	streams[s].words = grow(streams[s].words, &streams[s].cap, streams[s].n + 2, sizeof(kc_u64));
	streams[s].words[streams[s].n++] = a;
	streams[s].words[streams[s].n++] = b;
}

void kc_stream_word(enum kc_stream s, unsigned long long a)
{
	streams[s].words = grow(streams[s].words, &streams[s].cap, streams[s].n + 1, sizeof(kc_u64));
	streams[s].words[streams[s].n++] = a;
}

static void text_append(const char *buf, size_t n)
{
	text = grow(text, &cap_text, ntext + n + 1, 1);
	memcpy(text + ntext, buf, n);
	ntext += n;
}

/*
 * vsnprintf with the kernel's pointer extensions the KHO code uses: %pa
 * (a phys_addr_t passed by reference) and %pe (an ERR_PTR). Each conversion
 * is formatted on its own so that the argument is fetched with its real type.
 */
static unsigned long long text_vadd(const char *fmt, va_list ap)
{
	unsigned long long off = ntext;
	char spec[32], buf[256];
	int n;

	while (*fmt) {
		const char *start = fmt;
		size_t len;

		if (*fmt != '%') {
			while (*fmt && *fmt != '%')
				fmt++;
			text_append(start, fmt - start);
			continue;
		}
		fmt++;
		fmt += strspn(fmt, "-+ #0123456789.");
		fmt += strspn(fmt, "hlzjt");
		if (!*fmt)
			break;
		len = fmt - start + 1;
		if (len >= sizeof(spec))
			len = sizeof(spec) - 1;
		memcpy(spec, start, len);
		spec[len] = 0;
		switch (*fmt) {
		case 'p':
			if (fmt[1] == 'a') {
				n = snprintf(buf, sizeof(buf), "0x%016llx", *va_arg(ap, unsigned long long *));
				fmt++;
			} else if (fmt[1] == 'e') {
				n = snprintf(buf, sizeof(buf), "%ld", (long)va_arg(ap, void *));
				fmt++;
			} else {
				n = snprintf(buf, sizeof(buf), spec, va_arg(ap, void *));
			}
			break;
		case 's':
			n = snprintf(buf, sizeof(buf), spec, va_arg(ap, const char *));
			break;
		case '%':
			n = snprintf(buf, sizeof(buf), "%%");
			break;
		default: /* integer conversions: by their length modifier */
			if (strstr(spec, "ll") || strchr(spec, 'z') || strchr(spec, 'l') || strchr(spec, 'j') || strchr(spec, 't'))
				n = snprintf(buf, sizeof(buf), spec, va_arg(ap, long long));
			else
				n = snprintf(buf, sizeof(buf), spec, va_arg(ap, int));
		}
		fmt++;
		if (n > 0)
			text_append(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
	}
	text_append("", 1);
	return off;
}

unsigned long long kc_text(const char *fmt, ...)
{
	va_list ap;
	unsigned long long off;

	va_start(ap, fmt);
	off = text_vadd(fmt, ap);
	va_end(ap);
	return off;
}

void kc_printk(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kc_record(KC_REC_LOG, text_vadd(fmt, ap), 0, 0);
	va_end(ap);
}

int kc_warn(int cond, int site, int once, const char *func, int line, const char *what)
{
	if (!cond)
		return 0;
	if (once && site < WARN_SITES) {
		if (warn_once_fired[site])
			return cond;
		warn_once_fired[site] = 1;
	}
	if (kc_cur_op != warn_op) {
		warn_op = kc_cur_op;
		warns_this_op = 0;
	}
	if (warns_this_op++ < KC_WARN_CAP)
		kc_record(KC_REC_WARN, kc_text("%s:%d: %s", func, line, what), 0, 0);
	return cond;
}

void kc_bug(const char *func, int line, const char *what)
{
	kc_record(KC_REC_EVENT, kc_text("BUG at %s:%d: %s", func, line, what), 0, 0);
	if (protecting)
		siglongjmp(protect_env, 1);
	abort();
}

long kc_strscpy(char *d, const char *s, unsigned long n)
{
	unsigned long len;

	if (!n || n > 0x7fffffffUL) /* the kernel refuses counts past INT_MAX */
		return -7; /* -E2BIG */
	len = strnlen(s, n);
	if (len == n) {
		memcpy(d, s, n - 1);
		d[n - 1] = 0;
		return -7;
	}
	memcpy(d, s, len + 1);
	return len;
}

/* ---- physical memory and struct pages ---- */

void *kc_phys_to_virt(unsigned long long phys)
{
	unsigned long long base = phys & ~(unsigned long long)(PG_SIZE - 1);
	unsigned int slot;

	/* Like the kernel's direct map: an address outside the arena is a
	 * number until something dereferences it (and then it faults). */
	if (phys < DIRECT_MAP_BYTES)
		return (void *)(kc_page_offset + (unsigned long)phys);
	for (slot = 0; slot < high_used; slot++)
		if (high_phys[slot] == base)
			return high_map + slot * PG_SIZE + (phys - base);
	if (high_used == HIGH_SLOTS) {
		kc_record(KC_REC_EVENT, kc_text("more than %d distinct pages above the direct map", HIGH_SLOTS), 0, 0);
		slot = HIGH_SLOTS - 1;
	} else {
		slot = high_used++;
	}
	high_phys[slot] = base;
	return high_map + slot * PG_SIZE + (phys - base);
}

unsigned long long kc_virt_to_phys(const volatile void *virt)
{
	unsigned long v = (unsigned long)virt;

	if (v >= (unsigned long)high_map && v < (unsigned long)high_map + HIGH_SLOTS * PG_SIZE) {
		unsigned long off = v - (unsigned long)high_map;

		return high_phys[off / PG_SIZE] + off % PG_SIZE;
	}
	return v - kc_page_offset;
}

int kc_is_ram(unsigned long pfn)
{
	if (pfn >= arena_first_pfn && pfn < arena_first_pfn + hdr.arena_pages)
		return 1;
	for (unsigned int i = 0; i < hdr.n_ram; i++)
		if (pfn >= hdr.ram[i].a && pfn < hdr.ram[i].b)
			return 1;
	return 0;
}

static struct page *touch(unsigned long pfn)
{
	if (pfn < memmap_lo)
		memmap_lo = pfn;
	if (pfn + 1 > memmap_hi)
		memmap_hi = pfn + 1;
	return &memmap[pfn];
}

struct page *kc_pfn_to_page(unsigned long pfn)
{
	if (kc_is_ram(pfn))
		return touch(pfn);
	/* No struct page exists here: hand out a scratch one, and say so when
	 * the next kernel's memory init is what asked (NextBoot.phantom). */
	if (memory_init)
		kc_stream_word(KC_STREAM_PHANTOM, pfn);
	memset(&sink_page, 0, sizeof(sink_page));
	sink_page.kc_pfn = pfn;
	return &sink_page;
}

/* A page the caller owns (a folio it preserves), whatever its pfn: the
 * kernel reads its pfn and order, and never reaches past it. */
static struct page caller_page;

struct page *kc_caller_page(unsigned long pfn, unsigned int order)
{
	memset(&caller_page, 0, sizeof(caller_page));
	caller_page.kc_pfn = pfn;
	caller_page.kc_order = order;
	return &caller_page;
}

/* Any other page pointer is memmap + pfn, also past the pages that exist:
 * a restore steps through every struct page of a block (page + i) without
 * reading them, however far the block reaches. */
unsigned long kc_page_to_pfn(const struct page *page)
{
	if (page == &sink_page || page == &caller_page)
		return page->kc_pfn;
	return ((unsigned long)page - (unsigned long)memmap) / sizeof(struct page);
}

/*
 * Page reference counts, kept as runs of equal counts rather than in the
 * struct pages: a restore sets the count of every page of a block in one
 * ascending loop, and a block may span more pages than the machine has
 * struct pages or memory for. Memory grows with the runs, not the pages.
 * A page in no run has count 0.
 */
struct ref_run {
	unsigned long start, end; /* [start, end) */
	int count;                /* never 0 */
};
static struct ref_run *ref_runs;
static unsigned long nref_runs, cap_ref_runs, ref_cursor;

/* The first run ending after pfn (nref_runs if none); ascending loops hit
 * the cursor and cost O(1) per page. */
static unsigned long ref_find(unsigned long pfn)
{
	unsigned long lo = 0, hi = nref_runs;

	for (unsigned long i = ref_cursor; i <= nref_runs && i <= ref_cursor + 1; i++)
		if ((i == 0 || ref_runs[i - 1].end <= pfn) && (i == nref_runs || ref_runs[i].end > pfn))
			return ref_cursor = i;
	while (lo < hi) {
		unsigned long mid = lo + (hi - lo) / 2;

		if (ref_runs[mid].end > pfn)
			hi = mid;
		else
			lo = mid + 1;
	}
	return ref_cursor = lo;
}

static void ref_insert(unsigned long at, unsigned long start, unsigned long end, int count)
{
	ref_runs = grow(ref_runs, &cap_ref_runs, nref_runs + 1, sizeof(*ref_runs));
	memmove(ref_runs + at + 1, ref_runs + at, (nref_runs - at) * sizeof(*ref_runs));
	ref_runs[at] = (struct ref_run){ start, end, count };
	nref_runs++;
}

static void ref_remove(unsigned long at)
{
	memmove(ref_runs + at, ref_runs + at + 1, (nref_runs - at - 1) * sizeof(*ref_runs));
	nref_runs--;
}

int kc_page_count(const struct page *page)
{
	unsigned long pfn = kc_page_to_pfn(page), i = ref_find(pfn);

	return i < nref_runs && ref_runs[i].start <= pfn ? ref_runs[i].count : 0;
}

void kc_set_page_count(const struct page *page, int count)
{
	unsigned long pfn = kc_page_to_pfn(page), i = ref_find(pfn);
	struct ref_run *r = i < nref_runs ? &ref_runs[i] : NULL;

	if (r && r->start <= pfn) { /* inside run i: cut pfn out of it */
		struct ref_run old = *r;

		if (old.count == count)
			return;
		ref_remove(i);
		if (old.end > pfn + 1)
			ref_insert(i, pfn + 1, old.end, old.count);
		if (old.start < pfn)
			ref_insert(i++, old.start, pfn, old.count);
		r = i < nref_runs ? &ref_runs[i] : NULL;
	}
	if (!count)
		return;
	/* in the gap before run i (r): extend a neighbour or start a run */
	if (i > 0 && ref_runs[i - 1].end == pfn && ref_runs[i - 1].count == count) {
		ref_runs[i - 1].end++;
		if (r && r->start == pfn + 1 && r->count == count) {
			ref_runs[i - 1].end = r->end;
			ref_remove(i);
		}
	} else if (r && r->start == pfn + 1 && r->count == count) {
		r->start = pfn;
	} else {
		ref_insert(i, pfn, pfn + 1, count);
	}
	ref_cursor = i > 0 ? i - 1 : 0;
}

struct page *kc_pfn_to_online_page(unsigned long pfn)
{
	return kc_is_ram(pfn) ? touch(pfn) : NULL;
}

int kc_pfn_to_nid(unsigned long pfn)
{
	int nid = 0;

	for (unsigned int i = 0; i < hdr.n_numa && hdr.numa[i].a <= pfn; i++)
		nid = (int)hdr.numa[i].b;
	return nid;
}

void kc_adjust_managed(long pages)
{
	managed_pages += pages;
}

long kc_managed_pages(void)
{
	return managed_pages;
}

/* ---- page allocator: lowest free naturally aligned block first ---- */

void *kc_arena_page(unsigned long index)
{
	return direct_map + KC_ARENA_BASE_PHYS + index * PG_SIZE;
}

unsigned long kc_arena_pages(void)
{
	return hdr.arena_pages;
}

unsigned long kc_arena_hwm(void)
{
	return arena_hwm;
}

static int block_free(unsigned long start, unsigned long n)
{
	for (unsigned long i = start; i < start + n; i++)
		if (arena_used[i])
			return 0;
	return 1;
}

static void mark(unsigned long start, unsigned long n, int used)
{
	memset(arena_used + start, used, n);
	if (used && start + n > arena_hwm)
		arena_hwm = start + n;
}

void kc_arena_reserve(unsigned long first, unsigned long n)
{
	if (first >= hdr.arena_pages)
		return;
	if (first + n > hdr.arena_pages)
		n = hdr.arena_pages - first;
	mark(first, n, 1);
}

void *kc_alloc_pages(unsigned int order)
{
	unsigned long n, start;

	alloc_count++;
	if (fault_armed && hdr.fail_alloc && alloc_count == hdr.fail_alloc)
		return NULL;
	if (order >= 32)
		return NULL;
	n = 1UL << order;
	start = order ? n : arena_hint;
	for (; start + n <= hdr.arena_pages; start += order ? n : 1) {
		struct page *head;

		if (!block_free(start, n))
			continue;
		mark(start, n, 1);
		arena_order[start] = order + 1;
		if (!order)
			arena_hint = start + 1;
		memset(kc_arena_page(start), 0, n * PG_SIZE);
		head = touch(arena_first_pfn + start);
		head->kc_order = 0; /* not compound unless the caller makes it so */
		kc_set_page_count(head, 1);
		return kc_arena_page(start);
	}
	return NULL;
}

/* Give 2^order pages from pfn back to the allocator; only arena pages are
 * the allocator's (other RAM is restored and freed, but never handed out). */
static void free_block(unsigned long pfn, unsigned int order)
{
	unsigned long index = pfn - arena_first_pfn, n = order < 32 ? 1UL << order : ~0UL;

	if (pfn < arena_first_pfn || index >= hdr.arena_pages)
		return;
	if (n > hdr.arena_pages - index)
		n = hdr.arena_pages - index;
	mark(index, n, 0);
	arena_order[index] = 0;
	if (index < arena_hint)
		arena_hint = index;
}

void kc_free_pages(const void *addr)
{
	unsigned long long phys;
	unsigned long index;

	if (!addr)
		return;
	phys = kc_virt_to_phys(addr);
	index = (phys - KC_ARENA_BASE_PHYS) / PG_SIZE;
	if (phys < KC_ARENA_BASE_PHYS || index >= hdr.arena_pages || !arena_order[index]) {
		kc_record(KC_REC_EVENT, kc_text("free of a page the allocator did not hand out: phys %#llx", phys), 0, 0);
		return;
	}
	kc_set_page_count(touch(arena_first_pfn + index), 0);
	free_block(arena_first_pfn + index, arena_order[index] - 1);
}

/* put_page(): the last reference frees the page, or the whole block of a
 * compound head (a restored folio, an allocated folio). */
void kc_put_page(struct page *page)
{
	int count = kc_page_count(page);

	if (count <= 0)
		kc_bug(__func__, __LINE__, "put of a page whose refcount is 0");
	kc_set_page_count(page, count - 1);
	if (count == 1)
		free_block(kc_page_to_pfn(page), page->kc_order);
}

/* ---- vmalloc ---- */

/*
 * Areas live in host memory at fake addresses from VMALLOC_START (never
 * dereferenced: KHO only hands them back). The caller's area, the one a
 * preserve op names, is rebuilt for each op; areas a restore creates are
 * kept until the next program.
 */
#define VMALLOC_START_ADDR 0xffffc90000000000UL
static struct vm_struct caller_area;
static struct vm_struct **areas;
static unsigned long nareas, cap_areas, next_area_offset;

struct vm_struct *kc_find_vm_area(const void *addr)
{
	if (addr && addr == caller_area.addr)
		return &caller_area;
	for (unsigned long i = 0; addr && i < nareas; i++)
		if (areas[i]->addr == addr)
			return areas[i];
	return NULL;
}

void *kc_make_vm_area(unsigned long pfn, unsigned int nr_pages, unsigned int order, unsigned long flags)
{
	free(caller_area.pages);
	caller_area = (struct vm_struct){ (void *)VMALLOC_START_ADDR, (unsigned long)nr_pages << KC_PAGE_SHIFT, flags,
					  calloc(nr_pages, sizeof(struct page *)), order, nr_pages };
	if (!caller_area.pages) {
		fputs("kho-conform runtime: out of memory\n", stderr);
		abort();
	}
	for (unsigned int i = 0; i < nr_pages; i++)
		caller_area.pages[i] = kc_pfn_to_page(pfn + i);
	return caller_area.addr;
}

/* __get_vm_area_node(): an area of size bytes rounded up to 2^shift. */
struct vm_struct *kc_get_vm_area(unsigned long size, unsigned int shift, unsigned long flags)
{
	unsigned long align, aligned;
	struct vm_struct *area;

	if (!size || shift >= 64)
		return NULL;
	align = 1UL << shift;
	aligned = (size + align - 1) & ~(align - 1);
	if (!aligned || aligned > KC_VMALLOC_BYTES)
		return NULL;
	area = calloc(1, sizeof(*area));
	areas = grow(areas, &cap_areas, nareas + 1, sizeof(*areas));
	if (!area) {
		fputs("kho-conform runtime: out of memory\n", stderr);
		abort();
	}
	areas[nareas++] = area;
	area->addr = (void *)(VMALLOC_START_ADDR + KC_VMALLOC_BYTES + next_area_offset);
	area->size = aligned;
	area->flags = flags;
	next_area_offset += aligned;
	return area;
}

void kc_free_vm_area(struct vm_struct *area)
{
	for (unsigned long i = 0; i < nareas; i++)
		if (areas[i] == area) {
			areas[i] = areas[--nareas];
			free(area);
			return;
		}
}

/*
 * Arrays carry their size in front, so that vmap can tell where one ends.
 * Without ASan (which reports an overflow with its stack), an array ends at a
 * PROT_NONE page: a kernel that writes past it faults, and the fault is
 * contained, instead of corrupting the host's heap.
 */
#define KC_HOST_PAGE 4096UL

void *kc_kvmalloc_array(unsigned long n, unsigned long size)
{
	unsigned long *p, bytes;

	if (size && n > (~0UL - 4 * KC_HOST_PAGE) / size)
		return NULL;
	bytes = n * size + sizeof(*p) * 2;
#ifdef KC_ASAN
	p = calloc(1, bytes);
	if (!p)
		return NULL;
#else
	{
		unsigned long data = (bytes + KC_HOST_PAGE - 1) & ~(KC_HOST_PAGE - 1);
		char *base = mmap(NULL, data + KC_HOST_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
				  -1, 0);

		if (base == MAP_FAILED)
			return NULL;
		mprotect(base + data, KC_HOST_PAGE, PROT_NONE);
		/* 8-byte aligned (pointers), less than a page from the mapping's start */
		p = (unsigned long *)(base + ((data - bytes) & ~7UL));
		p[1] = data + KC_HOST_PAGE;
	}
#endif
	p[0] = n * size;
	return p + 2;
}

void kc_kvfree(const void *p)
{
	unsigned long *head = (unsigned long *)p - 2;

	if (!p)
		return;
#ifdef KC_ASAN
	free(head);
#else
	munmap((void *)((unsigned long)head & ~(KC_HOST_PAGE - 1)), head[1]);
#endif
}

/* vmap_pages_range(): map the area's pages, a block of 2^(shift - PAGE_SHIFT)
 * pages from each block head; recorded as runs of pfns (Rec.VMAP). */
int kc_vmap_pages(unsigned long addr, unsigned long end, struct page **pages, unsigned int shift)
{
	unsigned long nr = (end - addr) >> KC_PAGE_SHIFT, step = 1UL << (shift - KC_PAGE_SHIFT);
	unsigned long have = ((unsigned long *)pages)[-2] / sizeof(*pages);
	unsigned long run_pfn = 0, run_len = 0;

	for (unsigned long i = 0; i < nr; i += step) {
		unsigned long pfn;

		if (i >= have)
			kc_bug(__func__, __LINE__, "vmap past the end of the pages array");
		pfn = kc_page_to_pfn(pages[i]);
		if (run_len && run_pfn + run_len == pfn) {
			run_len += step;
			continue;
		}
		if (run_len)
			kc_record(KC_REC_VMAP, run_pfn, run_len, 0);
		run_pfn = pfn;
		run_len = step;
	}
	if (run_len)
		kc_record(KC_REC_VMAP, run_pfn, run_len, 0);
	return 0;
}

static void forget_vm_areas(void)
{
	for (unsigned long i = 0; i < nareas; i++) {
		kc_kvfree(areas[i]->pages);
		free(areas[i]);
	}
	nareas = next_area_offset = 0;
}

int kc_slab_is_available(void)
{
	return slab_ready;
}

/* The next kernel's memory init is over: the page allocator is up. */
void kc_set_slab_ready(int ready)
{
	slab_ready = ready;
	memory_init = !ready;
}

/* ---- memblock ---- */

void kc_memblock_record(int kind, unsigned long long base, unsigned long long size)
{
	switch (kind) {
	case KC_MB_RESERVE:
		kc_stream_pair(KC_STREAM_RESERVED, base, size);
		break;
	case KC_MB_NOINIT:
		kc_stream_pair(KC_STREAM_NOINIT, base, size);
		break;
	case KC_MB_SCRATCH:
		kc_stream_pair(KC_STREAM_SCRATCH_MARKS, base, size);
		break;
	default:
		kc_record(KC_REC_MEMBLOCK, base, size, kind);
	}
}

unsigned long long kc_memblock_end_of_dram(void)
{
	unsigned long long end = (unsigned long long)(arena_first_pfn + hdr.arena_pages) << KC_PAGE_SHIFT;

	for (unsigned int i = 0; i < hdr.n_ram; i++)
		if ((hdr.ram[i].b << KC_PAGE_SHIFT) > end)
			end = hdr.ram[i].b << KC_PAGE_SHIFT;
	for (unsigned int i = 0; i < hdr.n_scratch; i++)
		if (hdr.scratch[i].a + hdr.scratch[i].b > end)
			end = hdr.scratch[i].a + hdr.scratch[i].b;
	return end;
}

/* ---- program lifecycle ---- */

/* "lib.so+0x1234": symbolized to a kernel source line by the binding */
static const char *code_location(void *pc)
{
	static char buf[256];
	Dl_info info;

	if (dladdr(pc, &info) && info.dli_fname)
		snprintf(buf, sizeof(buf), "%s+%#lx", info.dli_fname, (unsigned long)pc - (unsigned long)info.dli_fbase);
	else
		snprintf(buf, sizeof(buf), "%p", pc);
	return buf;
}

unsigned long long kc_code_offset(void *pc)
{
	Dl_info info;

	return dladdr(pc, &info) ? (unsigned long)pc - (unsigned long)info.dli_fbase : 0;
}

static struct sigaction previous[NSIG];

static void on_fault(int sig, siginfo_t *info, void *uctx)
{
	if (!protecting) {
		/* Not ours: another kernel library loaded in this process may be
		 * running, or it is a real crash. */
		if (previous[sig].sa_flags & SA_SIGINFO && previous[sig].sa_sigaction)
			previous[sig].sa_sigaction(sig, info, uctx);
		else if (previous[sig].sa_handler != SIG_DFL && previous[sig].sa_handler != SIG_IGN)
			previous[sig].sa_handler(sig);
		else {
			signal(sig, SIG_DFL);
			raise(sig);
		}
		return;
	}
	fault_signal = sig;
	fault_addr = (unsigned long long)(unsigned long)(sig == SIGVTALRM ? 0 : info->si_addr);
#if defined(__x86_64__)
	fault_pc = (void *)((ucontext_t *)uctx)->uc_mcontext.gregs[REG_RIP];
#endif
	siglongjmp(protect_env, 1);
}

static void init_once(void)
{
	struct sigaction sa;

	if (direct_map)
		return;
	direct_map = mmap(NULL, DIRECT_MAP_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	high_map = mmap(NULL, HIGH_SLOTS * PG_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	memmap = mmap(NULL, KC_MAX_RAM_PFN * sizeof(struct page), PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (direct_map == MAP_FAILED || memmap == MAP_FAILED || high_map == MAP_FAILED) {
		fputs("kho-conform runtime: cannot reserve address space\n", stderr);
		abort();
	}
	kc_page_offset = (unsigned long)direct_map;
	shortcuts = !(getenv("KHO_CONFORM_SHORTCUTS") && !strcmp(getenv("KHO_CONFORM_SHORTCUTS"), "0"));
	arena_order = calloc(KC_MAX_ARENA_PAGES, 1);
	arena_used = calloc(KC_MAX_ARENA_PAGES, 1);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_fault;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, &previous[SIGSEGV]);
	sigaction(SIGBUS, &sa, &previous[SIGBUS]);
	sigaction(SIGVTALRM, &sa, &previous[SIGVTALRM]);
	sigaction(SIGILL, &sa, &previous[SIGILL]);
}

/* Memory a program used is zeroed with memset while it is small, so that
 * the next program finds it mapped (no page faults); larger spans go back
 * to the system. Either way the bytes read as zero afterwards. The arena
 * below its high-water mark is dense (every page was allocated or
 * written); the struct pages' span is sparse (a few pfns far apart), so
 * only a short one is cheaper to memset than to drop. */
#define KC_MEMSET_ARENA (8UL << 20)
#define KC_MEMSET_MEMMAP (64UL << 10)

/* Zero the whole OS pages of [p, p + len), as MADV_DONTNEED would. */
static void zero_pages(void *p, unsigned long len, unsigned long memset_below)
{
	unsigned long start = (unsigned long)p & ~4095UL;
	unsigned long end = ((unsigned long)p + len + 4095) & ~4095UL;

	if (shortcuts && end - start <= memset_below)
		memset((void *)start, 0, end - start);
	else
		madvise((void *)start, end - start, MADV_DONTNEED);
}

/* A new kernel (or program) starts with fresh struct pages: drop the span
 * the last one touched. */
static void forget_struct_pages(void)
{
	if (memmap_hi > memmap_lo) {
		unsigned long hi = memmap_hi < KC_MAX_RAM_PFN ? memmap_hi : KC_MAX_RAM_PFN;

		zero_pages(memmap + memmap_lo, (hi - memmap_lo) * sizeof(struct page), KC_MEMSET_MEMMAP);
	}
	memmap_lo = ~0UL;
	memmap_hi = 0;
	nref_runs = ref_cursor = 0;
}

int kc_setup(const struct kc_header *h, unsigned long nsteps)
{
	unsigned long want;

	init_once();
	kc_sanitizer_attach();
	if (h->page_shift != KC_PAGE_SHIFT || h->arena_pages < 2 || h->arena_pages > KC_MAX_ARENA_PAGES ||
	    h->n_ram > KC_MAX_RAM_RANGES || h->n_numa > KC_MAX_NUMA_RANGES || h->n_scratch > KC_MAX_SCRATCH)
		return -1;
	/* Forget the previous program: every arena page (up to the high-water
	 * mark, and above it: a wild write may have reached there), touched
	 * struct pages. */
	if (arena_mapped) {
		unsigned long used = arena_hwm * PG_SIZE < arena_mapped ? arena_hwm * PG_SIZE : arena_mapped;

		zero_pages(kc_arena_page(0), used, KC_MEMSET_ARENA);
		if (arena_mapped > used)
			madvise(kc_arena_page(0) + used, arena_mapped - used, MADV_DONTNEED);
	}
	high_used = 0;
	forget_vm_areas();
	memset(arena_order, 0, hdr.arena_pages ? hdr.arena_pages : KC_MAX_ARENA_PAGES);
	memset(arena_used, 0, hdr.arena_pages ? hdr.arena_pages : KC_MAX_ARENA_PAGES);
	forget_struct_pages();
	hdr = *h;
	arena_first_pfn = KC_ARENA_BASE_PHYS >> KC_PAGE_SHIFT;
	want = hdr.arena_pages * PG_SIZE;
	if (want != arena_mapped) {
		if (arena_mapped)
			mprotect(kc_arena_page(0), arena_mapped, PROT_NONE);
		mprotect(kc_arena_page(0), want, PROT_READ | PROT_WRITE);
		arena_mapped = want;
	}
	arena_used[0] = 1; /* page 0: the scratch descriptors */
	arena_hint = arena_hwm = 1;
	alloc_count = 0;
	managed_pages = 0;
	nrecs = ntext = 0;
	for (int i = 0; i < KC_NSTREAMS; i++)
		streams[i].n = 0;
	answers = grow(answers, &cap_answers, nsteps, sizeof(*answers));
	for (unsigned long i = 0; i < nsteps; i++)
		answers[i] = (struct kc_answer){ (kc_u64)(long)KC_NOT_RUN, 0, 0 };
	nanswers = nsteps;
	warn_op = ~0u;
	snapshot_pages = 0;
	kc_cur_op = KC_OP_BOOT;
	return 0;
}

void kc_start_kernel(int next)
{
	forget_struct_pages();
	memset(warn_once_fired, 0, sizeof(warn_once_fired));
	memory_init = next; /* a next kernel starts with its memory init */
	fault_armed = !next;
	slab_ready = !next;
	managed_pages = 0;
}

void kc_arena_written(unsigned long index)
{
	if (index < hdr.arena_pages && index + 1 > arena_hwm)
		arena_hwm = index + 1;
}

void kc_snapshot(void)
{
	snapshot = realloc(snapshot, arena_hwm * PG_SIZE);
	memcpy(snapshot, kc_arena_page(0), arena_hwm * PG_SIZE);
	snapshot_pages = arena_hwm;
}

/* The build names its flavor's budget (contract.CPU_BUDGET_MS). */
#ifndef KC_BUDGET_MS
#define KC_BUDGET_MS KC_BUDGET_MS_PLAIN
#endif

void kc_op_budget(void)
{
	struct itimerval budget = { { 0, 0 }, { KC_BUDGET_MS / 1000, KC_BUDGET_MS % 1000 * 1000 } };

	if (protecting)
		setitimer(ITIMER_VIRTUAL, &budget, NULL);
}

int kc_protected(void (*fn)(void *), void *arg)
{
	struct itimerval off = { { 0, 0 }, { 0, 0 } };

	if (sigsetjmp(protect_env, 1)) {
		protecting = 0;
		setitimer(ITIMER_VIRTUAL, &off, NULL);
		if (fault_signal == SIGVTALRM)
			kc_record(KC_REC_EVENT,
				  KC_BUDGET_MS % 1000 ? kc_text("timeout: over %d ms of CPU in kernel code", KC_BUDGET_MS)
						      : kc_text("timeout: over %d s of CPU in kernel code", KC_BUDGET_MS / 1000),
				  0, 0);
		else if (fault_signal)
			kc_record(KC_REC_EVENT,
				  kc_text("fault: %s at %#llx (phys %#llx), outside the arena, in %s", strsignal(fault_signal),
					  fault_addr, kc_virt_to_phys((void *)(unsigned long)fault_addr),
					  code_location(fault_pc)), 0, 0);
		fault_signal = 0;
		return 1;
	}
	protecting = 1;
	kc_op_budget();
	fn(arg);
	setitimer(ITIMER_VIRTUAL, &off, NULL);
	protecting = 0;
	return 0;
}

/* ---- what Python reads after a run ---- */

const struct kc_rec *kc_records(unsigned long *n)
{
	*n = nrecs;
	return recs;
}

const unsigned long long *kc_stream(unsigned int s, unsigned long *n)
{
	*n = s < KC_NSTREAMS ? streams[s].n : 0;
	return s < KC_NSTREAMS ? streams[s].words : NULL;
}

const void *kc_answers(unsigned long *n)
{
	*n = nanswers;
	return answers;
}

const char *kc_text_buffer(unsigned long *n)
{
	*n = ntext;
	return text;
}

const unsigned char *kc_snapshot_pages(unsigned long *n)
{
	*n = snapshot_pages;
	return snapshot;
}
