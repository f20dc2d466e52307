/*
 * Memory management as KHO sees it: pages, folios, the page allocator,
 * memblock and NUMA. All state lives in kc_runtime.c.
 */
#ifndef KC_MM_H
#define KC_MM_H

#include "types.h"
#include "kc_runtime.h"
#include <linux/pfn.h>

#ifndef KC_PAGE_SHIFT
#error "build with -DKC_PAGE_SHIFT=12|14|16"
#endif
#define PAGE_SHIFT KC_PAGE_SHIFT
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define PAGE_MASK (~(PAGE_SIZE - 1))
#define MAX_PAGE_ORDER KC_MAX_PAGE_ORDER
#define MAX_ORDER_NR_PAGES (1 << MAX_PAGE_ORDER)
#define pageblock_order MAX_PAGE_ORDER
#define pageblock_nr_pages (1UL << pageblock_order)
#define CMA_MIN_ALIGNMENT_PAGES pageblock_nr_pages
#define CMA_MIN_ALIGNMENT_BYTES (PAGE_SIZE * CMA_MIN_ALIGNMENT_PAGES)
#define NUMA_NO_NODE (-1)
#define MAX_NUMNODES 64

#define GFP_KERNEL 0x1u
#define __GFP_ZERO 0x2u
#define GFP_NOWAIT 0x4u

/* the direct map */
#define __va(x) kc_phys_to_virt((unsigned long long)(x))
#define __pa(x) ((phys_addr_t)kc_virt_to_phys(x))
#define phys_to_virt(x) kc_phys_to_virt((unsigned long long)(x))
#define virt_to_phys(x) ((phys_addr_t)kc_virt_to_phys(x))
#define early_memremap(phys, size) kc_phys_to_virt((unsigned long long)(phys))
#define early_memunmap(virt, size) ((void)(virt))

/* struct page store */
#define pfn_to_page(pfn) kc_pfn_to_page((unsigned long)(pfn))
#define page_to_pfn(page) kc_page_to_pfn(page)
#define pfn_to_online_page(pfn) kc_pfn_to_online_page((unsigned long)(pfn))
#define page_to_phys(page) ((phys_addr_t)page_to_pfn(page) << PAGE_SHIFT)
#define phys_to_page(phys) pfn_to_page((phys) >> PAGE_SHIFT)
#define virt_to_page(v) pfn_to_page(virt_to_phys(v) >> PAGE_SHIFT)
#define page_address(page) phys_to_virt(page_to_phys(page))
#define pfn_to_nid(pfn) kc_pfn_to_nid((unsigned long)(pfn))
#define early_pfn_to_nid(pfn) kc_pfn_to_nid((unsigned long)(pfn))
#define set_page_count(page, v) kc_set_page_count((page), (v))
#define page_count(page) kc_page_count(page)
#define clear_page_tag_ref(page) ((void)(page))
#define page_folio(page) ((struct folio *)(page))
#define folio_page(folio, n) (&(folio)->page + (n))
#define folio_pfn(folio) page_to_pfn(&(folio)->page)
#define folio_order(folio) ((folio)->page.kc_order)
#define folio_address(folio) page_address(&(folio)->page)
#define virt_to_folio(v) page_folio(virt_to_page(v))
#define adjust_managed_page_count(page, count) kc_adjust_managed(count)
#define init_cma_reserved_pageblock(page) ((void)(page))
#define init_deferred_page(pfn, nid) ((void)(pfn), (void)(nid))
static inline void prep_compound_page(struct page *page, unsigned int order)
{
	page->kc_order = order;
}

/* page allocator */
#define get_order(size) kc_get_order(size)
static inline int kc_get_order(unsigned long size)
{
	int order = 0;

	size = (size - 1) >> PAGE_SHIFT;
	while (size) {
		order++;
		size >>= 1;
	}
	return order;
}
#define get_zeroed_page(gfp) ((unsigned long)kc_alloc_pages(0))
#define __get_free_page(gfp) ((unsigned long)kc_alloc_pages(0))
#define free_page(addr) kc_free_page((unsigned long)(addr))
static inline void kc_free_page(unsigned long addr)
{
	if (addr) /* free_page(0) does nothing */
		kc_put_page(virt_to_page((const void *)addr));
}
#define __free_page(page) kc_put_page(page)
#define put_page(page) kc_put_page(page)
#define kzalloc(size, gfp) kc_alloc_pages(kc_get_order(size))
#define kmalloc(size, gfp) kc_alloc_pages(kc_get_order(size))
#define kfree(p) kc_free_pages(p)
#define slab_is_available() kc_slab_is_available()
static inline struct folio *folio_alloc(gfp_t gfp, unsigned int order)
{
	void *mem = kc_alloc_pages(order);

	if (!mem)
		return NULL;
	virt_to_page(mem)->kc_order = order;
	return page_folio(virt_to_page(mem));
}
#define folio_put(folio) kc_put_page(&(folio)->page)
/* A block that is not a compound page: each of its pages is its own order-0 folio. */
static inline struct page *alloc_pages(gfp_t gfp, unsigned int order)
{
	void *mem = kc_alloc_pages(order);
	struct page *page = mem ? virt_to_page(mem) : NULL;

	for (unsigned long i = 0; page && i < (1UL << order); i++)
		pfn_to_page(page_to_pfn(page) + i)->kc_order = 0;
	return page;
}
#define __free_pages(page, order) kc_free_pages(page_address(page))

/* memblock: recorded, never allocates from outside the arena */
#define MEMBLOCK_ALLOC_ANYWHERE (~(phys_addr_t)0)
#define MEMBLOCK_ALLOC_ACCESSIBLE 0
#define ARCH_LOW_ADDRESS_LIMIT 0xffffffffULL
#define memblock_reserve(base, size) (kc_memblock_record(KC_MB_RESERVE, (base), (size)), 0)
#define memblock_reserved_mark_noinit(base, size) (kc_memblock_record(KC_MB_NOINIT, (base), (size)), 0)
#define memblock_add(base, size) (kc_memblock_record(KC_MB_ADD, (base), (size)), 0)
#define memblock_mark_kho_scratch(base, size) (kc_memblock_record(KC_MB_SCRATCH, (base), (size)), 0)
#define memblock_set_kho_scratch_only() do { } while (0)
#define memblock_end_of_DRAM() ((phys_addr_t)kc_memblock_end_of_dram())
#define memblock_alloc(size, align) kc_alloc_pages(kc_get_order(size))
#define memblock_free(ptr, size) kc_free_pages(ptr)
#define memblock_phys_free(base, size) kc_memblock_record(KC_MB_FREE, (base), (size))
/* Scratch sizing and reservation run only on a cold boot with KHO enabled,
 * which the driver never does: they find nothing to allocate. */
#define memblock_phys_alloc_range(size, align, start, end) ((phys_addr_t)0)
#define memblock_phys_alloc(size, align) ((phys_addr_t)0)
#define memblock_alloc_range_nid(size, align, start, end, nid, exact) ((phys_addr_t)0)
#define memblock_reserved_kern_size(limit, nid) ((phys_addr_t)0)
#define memblock_reserved_hugetlb_size(limit, nid) ((phys_addr_t)0)
#define free_reserved_area(start, end, poison, s) ((void)(start), 0UL)

/* Releasing scratch (7.1) iterates memblock regions flagged KHO_SCRATCH to
 * set pageblock migratetypes: not observable here, so the walk is empty. */
typedef unsigned long ulong;
enum migratetype { MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE, MIGRATE_CMA };
#define MEMBLOCK_KHO_SCRATCH 0x40
struct memblock_type { unsigned long cnt; };
struct memblock { struct memblock_type memory, reserved; };
extern struct memblock memblock;
#define __for_each_mem_range(i, type_a, type_b, nid, flags, p_start, p_end, p_nid) \
	for ((i) = 0, (void)(type_a), (void)(p_start), (void)(p_end); (i) < 0; (i)++)
#define memmap_init_kho_scratch_pages() do { } while (0)
#define pageblock_start_pfn(pfn) ((pfn) & ~(pageblock_nr_pages - 1))
#define pageblock_align(pfn) (((pfn) + pageblock_nr_pages - 1) & ~(pageblock_nr_pages - 1))
#define init_pageblock_migratetype(page, mt, isolate) ((void)(page))

/* node states: a single node with memory as far as scratch sizing goes */
#define N_MEMORY 0
typedef struct { unsigned long bits[1]; } nodemask_t;
extern nodemask_t node_states[1];
#define nodes_weight(mask) 1
#define for_each_node_state(nid, state) for ((nid) = 0; (nid) < 1; (nid)++)

#endif
