/* vmalloc as KHO sees it: the area behind a pointer, new areas for restored
 * pages, and kvmalloc for their pages arrays. State lives in kc_runtime.c. */
#ifndef KC_VMALLOC_H
#define KC_VMALLOC_H

#include "types.h"
#include "kc_runtime.h"

#define VM_ALLOC 0x00000002
#define VM_MAP 0x00000004
#define VM_UNINITIALIZED 0x00000020
#define VM_ALLOW_HUGE_VMAP 0x00000400
#define VMALLOC_START 0xffffc90000000000UL
#define VMALLOC_END (VMALLOC_START + KC_VMALLOC_BYTES)
typedef unsigned long pgprot_t;
#define PAGE_KERNEL ((pgprot_t)0)
typedef unsigned int kasan_vmalloc_flags_t;
#define KASAN_VMALLOC_NONE 0x0
#define KASAN_VMALLOC_INIT 0x1
#define KASAN_VMALLOC_VM_ALLOC 0x2
#define KASAN_VMALLOC_PROT_NORMAL 0x4

#define find_vm_area(addr) kc_find_vm_area(addr)
static inline unsigned int get_vm_area_page_order(struct vm_struct *vm)
{
	return vm->page_order;
}
static inline unsigned long get_vm_area_size(const struct vm_struct *area)
{
	return area->size;
}
/* Where an area lands is not observable: align and node are not modelled. */
#define __get_vm_area_node(size, align, shift, flags, start, end, node, gfp, caller) \
	kc_get_vm_area((size), (shift), (flags))
#define vmap_pages_range(addr, end, prot, pages, shift) kc_vmap_pages((addr), (end), (pages), (shift))
#define kasan_unpoison_vmalloc(addr, size, flags) (addr)
#define clear_vm_uninitialized_flag(area) ((area)->flags &= ~VM_UNINITIALIZED)
#define free_vm_area(area) kc_free_vm_area(area)

/* kvmalloc refuses more than INT_MAX bytes, and warns once. */
static inline void *kc_kvmalloc_checked(unsigned long n, unsigned long size)
{
	if (size && n > INT_MAX / size) {
		WARN_ON_ONCE(1);
		return NULL;
	}
	return kc_kvmalloc_array(n, size);
}
#define kvmalloc_objs(var, count, ...) ((__typeof__(&(var)))kc_kvmalloc_checked((count), sizeof(var)))
#define kvfree(p) kc_kvfree(p)

#define typecheck(type, x) \
	({ type __kc_dummy; __typeof__(x) __kc_dummy2; (void)(&__kc_dummy == &__kc_dummy2); 1; })

#endif
