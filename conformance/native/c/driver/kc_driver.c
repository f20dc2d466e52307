/*
 * The driver: runs one whole program against the kernel's KHO code in one
 * call. It is #included at the end of the extracted kexec_handover.c, so it
 * reaches the file's statics (kho_out, kho_in, kho_init) and its macros.
 *
 * Old kernel: KHO init (kho_init, the kernel's own fs_initcall), then the
 * ops. kexec ends the old kernel's run: its state is recorded (the handover
 * image: every page of the arena) and the call returns. The next kernel
 * boots in a call of its own from an image, its own old kernel's or any
 * other's, so it knows only what crossed kexec, as a real next kernel: the
 * arena holds the image, everything else (globals, the page allocator's
 * books, vm areas, struct pages, warn-once state) starts afresh. It runs
 * kho_populate, kho_memory_init_early (where the tree has it) and
 * kho_memory_init, then the restore ops.
 */
#include "kc_contract.h"

/* Kernel globals the KHO code reads that no shim function owns. */
struct uts_namespace init_uts_ns = { .name = { .release = "kho-conform" } };
nodemask_t node_states[1];
struct memblock memblock;

#define KC_GLOBALS_MAX (1 << 16)
static unsigned char kc_globals_saved[KC_GLOBALS_MAX];
static int kc_globals_have_snapshot;

/* The first call saves the globals' initial values; later calls restore them. */
static void kc_reset_globals(void)
{
	unsigned long off = 0;

	for (unsigned long i = 0; i < ARRAY_SIZE(kc_globals); i++) {
		BUG_ON(off + kc_globals[i].size > KC_GLOBALS_MAX);
		if (kc_globals_have_snapshot)
			memcpy(kc_globals[i].addr, kc_globals_saved + off, kc_globals[i].size);
		else
			memcpy(kc_globals_saved + off, kc_globals[i].addr, kc_globals[i].size);
		off += kc_globals[i].size;
	}
	kc_globals_have_snapshot = 1;
}

struct kc_run {
	const struct kc_header *h;
	const struct kc_step *steps;
	unsigned long nsteps;
	const unsigned char *image; /* a foreign handover image, or NULL */
	unsigned long image_len;
	bool enabled;               /* the old kernel's KHO came up */
	bool next;                  /* running the next kernel */
	bool handed_over;           /* the old kernel's run ended at kexec */
};

/* A folio or page the caller owns: the driver makes it, the kernel reads
 * its pfn and order. Outside RAM it exists only as this struct. */
static struct folio *kc_folio(u64 pfn, u64 order)
{
	return page_folio(kc_caller_page(pfn, (unsigned int)order));
}

/* The handover page (arena page 0): the caller's records of what it
 * preserved through the API, kept across kexec. */
static u64 *kc_alloc_slot(u64 slot)
{
	return (u64 *)((char *)kc_arena_page(0) + KC_ALLOC_SLOTS_OFFSET) + slot;
}

static struct kho_vmalloc *kc_vmalloc_slot(u64 slot)
{
	return (struct kho_vmalloc *)((char *)kc_arena_page(0) + KC_VMALLOC_SLOTS_OFFSET) + slot;
}

_Static_assert(sizeof(struct kho_vmalloc) == KC_VMALLOC_DESCRIPTOR_BYTES, "struct kho_vmalloc is the ABI's 16 bytes");

static unsigned long kc_vm_flags(u64 area_flags)
{
	return (area_flags & KC_AREA_ALLOC ? VM_ALLOC : 0) | (area_flags & KC_AREA_HUGE ? VM_ALLOW_HUGE_VMAP : 0) |
	       (area_flags & KC_AREA_MAPPED ? VM_MAP : 0);
}

static void kc_record_page_magic(phys_addr_t phys)
{
	unsigned long pfn = PHYS_PFN(phys);
	union kho_page_info info;

	if (!kc_is_ram(pfn))
		return;
	info.page_private = pfn_to_online_page(pfn)->private;
	if (info.magic == KHO_PAGE_MAGIC)
		kc_stream_pair(KC_STREAM_MAGIC, pfn, info.order);
}

#if KC_KEY_API
static int kc_walk_leaf(unsigned long key, void *data)
{
	unsigned int order;
	phys_addr_t phys = KC_DECODE_KEY(key, &order);

	kc_stream_pair(KC_STREAM_WALK, phys, order);
	kc_record_page_magic(phys);
	return 0;
}

static int kc_walk_node(phys_addr_t phys, void *data)
{
	kc_stream_word(KC_STREAM_WALK_NODE, phys);
	return 0;
}
#else
static int kc_walk_page(phys_addr_t phys, unsigned int order)
{
	kc_stream_pair(KC_STREAM_WALK, phys, order);
	kc_record_page_magic(phys);
	return 0;
}
#endif

/* The walk as the next kernel sees it, recorded by the driver's own
 * callbacks over the handed-over tree, with each head page's magic. */
static void kc_record_walk(void)
{
	struct kho_radix_tree tree = { 0 };
	const void *prop;
	int len;

	if (!is_kho_boot())
		return;
	prop = fdt_getprop(phys_to_virt(kho_in.fdt_phys), 0, KHO_FDT_MEMORY_MAP_PROP_NAME, &len);
	if (!prop || len != sizeof(u64))
		return;
	tree.root = phys_to_virt(get_unaligned((const u64 *)prop));
#if KC_KEY_API
	{
		const struct kho_radix_walk_cb cb = { .leaf = kc_walk_leaf, .node = kc_walk_node };

		kho_radix_walk_tree(&tree, &cb, NULL);
	}
#else
	kho_radix_walk_tree(&tree, kc_walk_page);
#endif
}

static void kc_record_state(void)
{
	kc_record(KC_REC_STATE, virt_to_phys(kho_out.radix_tree.root), kho_out.fdt ? virt_to_phys(kho_out.fdt) : 0,
		  kc_arena_hwm());
	kc_snapshot();
}

/* Lay a foreign image into the arena: struct kc_image, then npages x
 * (u64 phys, page bytes). */
static int kc_load_image(const unsigned char *p, unsigned long len, struct kc_image *hdr)
{
	unsigned long off = sizeof(*hdr);

	if (len < off)
		return -1;
	memcpy(hdr, p, off);
	for (unsigned long i = 0; i < hdr->npages; i++) {
		u64 phys, index;

		if (off + sizeof(u64) + PAGE_SIZE > len)
			return -1;
		memcpy(&phys, p + off, sizeof(u64));
		index = (phys - KC_ARENA_BASE_PHYS) >> PAGE_SHIFT;
		if (phys >= KC_ARENA_BASE_PHYS && index < kc_arena_pages() && !(phys & (PAGE_SIZE - 1))) {
			memcpy(kc_arena_page(index), p + off + sizeof(u64), PAGE_SIZE);
			kc_arena_reserve(index, 1);
		}
		off += sizeof(u64) + PAGE_SIZE;
	}
	return 0;
}

/* Pokes stand for corruption of the handover image in transit: applied at
 * kexec, so the old kernel never runs on corrupted state. */
static void kc_corrupt_image(const struct kc_run *run)
{
	for (unsigned long i = 0; i < kc_cur_op; i++) {
		const struct kc_step *s = &run->steps[i];

		if (s->op == KC_POKE_ARENA && s->a < kc_arena_pages() && s->b < PAGE_SIZE / sizeof(u64)) {
			((u64 *)kc_arena_page(s->a))[s->b] = s->c;
			kc_arena_written(s->a);
		}
		else if (s->op == KC_POKE_FDT && s->a < PAGE_SIZE)
			((u8 *)kho_out.fdt)[s->a] = (u8)s->b;
	}
}

/* kexec in the old kernel: the image is made (pokes corrupt it in transit)
 * and recorded; the run ends. */
static void kc_hand_over(struct kc_run *run)
{
	kc_corrupt_image(run);
	kc_record_state();
	run->handed_over = true;
}

/* The next kernel's boot from a handover image (steps[0], the kexec). */
static void kc_next_kernel(struct kc_run *run)
{
	struct kc_image image;

	if (kc_load_image(run->image, run->image_len, &image)) {
		kc_answer(-EINVAL, 0, 0);
		return;
	}
	/* the old kernel's pages survive kexec: the next one must not reuse them */
	kc_arena_reserve(0, image.arena_hwm);
	kc_reset_globals();
	kc_start_kernel(1);
	run->next = true;
	kho_populate(image.fdt_phys, PAGE_SIZE, image.scratch_phys, image.scratch_len);
#if KC_HAS_MEMORY_INIT_EARLY
	kho_memory_init_early();
#endif
	kho_memory_init();
	kc_set_slab_ready(1);
	kc_record_walk();
	kc_answer(is_kho_boot() ? 0 : -EINVAL, 0, 0);
}

static void kc_restore_op(const struct kc_step *s)
{
	bool folio = s->op == KC_RESTORE_FOLIO;
	long before = kc_managed_pages();
	struct page *page;

	if (folio) {
		struct folio *f = kho_restore_folio(s->a);

		page = f ? &f->page : NULL;
	} else {
		page = kho_restore_pages(s->a, s->b);
	}
	kc_answer(page ? 0 : -1, page ? page_to_pfn(page) : 0, kc_managed_pages() - before);
}

/* fill_fdt: kho_add_subtree of filler_name(first + i, name_len) with blob
 * filler_blob(first + i) and size first + i, until one fails. */
static void kc_fill_fdt(const struct kc_step *s)
{
	char name[KC_MAX_NAME + 1], digits[24];
	u64 i;
	int rc = 0;

	for (i = 0; i < s->b; i++) {
		u64 index = s->a + i, v = index;
		int n = 0, d = 0;

		do
			digits[d++] = '0' + v % 10;
		while (v /= 10);
		for (const char *p = KC_FILLER_PREFIX; *p; p++)
			name[n++] = *p;
		while (d)
			name[n++] = digits[--d];
		while ((u64)n < s->c && n < KC_MAX_NAME)
			name[n++] = KC_FILLER_PAD;
		name[n] = 0;
		rc = kho_add_subtree(name, phys_to_virt(KC_FILLER_BLOB_BASE + (index << PAGE_SHIFT)), index);
		if (rc)
			break;
	}
	kc_answer(rc, i, 0);
}

static void kc_old_kernel_op(struct kc_run *run, const struct kc_step *s)
{
	struct kho_radix_tree *tree = &kho_out.radix_tree;
	long rc = 0;

	if (!run->enabled || run->next) {
		kc_answer(-EOPNOTSUPP, 0, 0);
		return;
	}
	switch (s->op) {
	case KC_PRESERVE_FOLIO:
		rc = kho_preserve_folio(kc_folio(s->a, s->b));
		break;
	case KC_UNPRESERVE_FOLIO:
		kho_unpreserve_folio(kc_folio(s->a, s->b));
		break;
	case KC_PRESERVE_PAGES:
		rc = kho_preserve_pages(&kc_folio(s->a, 0)->page, s->b);
		break;
	case KC_UNPRESERVE_PAGES:
		kho_unpreserve_pages(&kc_folio(s->a, 0)->page, s->b);
		break;
#if KC_KEY_API
	case KC_RADIX_ADD:
		rc = kho_radix_add_key(tree, KC_ENCODE_KEY(PFN_PHYS(s->a), s->b));
		break;
	case KC_RADIX_DEL:
		kho_radix_del_key(tree, KC_ENCODE_KEY(PFN_PHYS(s->a), s->b));
		break;
	case KC_RADIX_ADD_KEY:
		rc = kho_radix_add_key(tree, s->a);
		break;
	case KC_RADIX_DEL_KEY:
		kho_radix_del_key(tree, s->a);
		break;
#else
	case KC_RADIX_ADD:
		rc = kho_radix_add_page(tree, s->a, s->b);
		break;
	case KC_RADIX_DEL:
		kho_radix_del_page(tree, s->a, s->b);
		break;
	case KC_RADIX_ADD_KEY:
	case KC_RADIX_DEL_KEY:
		rc = -EOPNOTSUPP; /* the page-API generation has no key API */
		break;
#endif
	case KC_ADD_SUBTREE:
		rc = kho_add_subtree(s->name, phys_to_virt(s->a), s->b);
		break;
	case KC_REMOVE_SUBTREE:
		kho_remove_subtree(phys_to_virt(s->a));
		break;
	case KC_POKE_ARENA:
	case KC_POKE_FDT:
		break; /* applied to the image at kexec: kc_corrupt_image() */
	case KC_FILL_FDT:
		kc_fill_fdt(s);
		return;
	case KC_ALLOC_PRESERVE: {
		void *mem = kho_alloc_preserve(s->b);

		*kc_alloc_slot(s->a) = IS_ERR(mem) ? 0 : virt_to_phys(mem);
		kc_answer(IS_ERR(mem) ? PTR_ERR(mem) : 0, *kc_alloc_slot(s->a), 0);
		return;
	}
	case KC_UNPRESERVE_FREE: {
		u64 *slot = kc_alloc_slot(s->a);

		kho_unpreserve_free(*slot ? phys_to_virt(*slot) : NULL);
		*slot = 0; /* the caller forgets the memory */
		break;
	}
	case KC_PRESERVE_VMALLOC: {
		struct kho_vmalloc *desc = kc_vmalloc_slot(s->a);
		/* operands no vmalloc area can have: a pointer to no area */
		void *area = s->is_vm_area ? kc_make_vm_area(s->b, s->c, s->d, kc_vm_flags(s->e)) : NULL;

		memset(desc, 0, sizeof(*desc));
		rc = kho_preserve_vmalloc(area, desc);
		kc_answer(rc, rc ? 0 : desc->first.phys, 0);
		if (rc) /* the caller keeps no failed preservation */
			memset(desc, 0, sizeof(*desc));
		return;
	}
	case KC_UNPRESERVE_VMALLOC:
		kho_unpreserve_vmalloc(kc_vmalloc_slot(s->a));
		memset(kc_vmalloc_slot(s->a), 0, sizeof(struct kho_vmalloc));
		break;
	}
	kc_answer(rc, 0, 0);
}

/* The restore side of the alloc and vmalloc API, with the pages each
 * handed to the managed count. */
static void kc_restore_api_op(const struct kc_step *s)
{
	long before = kc_managed_pages();

	if (s->op == KC_RESTORE_FREE) {
		u64 phys = *kc_alloc_slot(s->a);

		kho_restore_free(phys ? phys_to_virt(phys) : NULL);
		kc_answer(0, 0, kc_managed_pages() - before);
	} else {
		void *addr = kho_restore_vmalloc(kc_vmalloc_slot(s->a));
		struct vm_struct *area = kc_find_vm_area(addr);

		kc_answer(area ? 0 : -1, area ? area->nr_pages : 0, kc_managed_pages() - before);
	}
}

/* Queries: either kernel. */
static void kc_query_op(const struct kc_step *s)
{
	switch (s->op) {
	case KC_IS_KHO_ENABLED:
		kc_answer(0, kho_is_enabled(), 0);
		break;
	case KC_IS_KHO_BOOT:
		kc_answer(0, is_kho_boot(), 0);
		break;
	case KC_SCRATCH_OVERLAP:
#if KC_HAS_SCRATCH_OVERLAP
		kc_answer(0, kho_scratch_overlap(s->a, s->b), 0);
#else
		kc_answer(-EOPNOTSUPP, 0, 0); /* not public API before 7.3 */
#endif
		break;
	}
}

static void kc_step(struct kc_run *run, const struct kc_step *s)
{
	switch (s->op) {
	case KC_KEXEC:
		if (run->next || !run->enabled)
			kc_answer(-EOPNOTSUPP, 0, 0);
		else
			kc_hand_over(run);
		break;
	case KC_RESTORE_FOLIO:
	case KC_RESTORE_PAGES:
		/* before kexec there is no next kernel: nothing to restore from */
		if (run->next)
			kc_restore_op(s);
		else
			kc_answer(-1, 0, 0);
		break;
	case KC_RESTORE_FREE:
	case KC_RESTORE_VMALLOC:
		if (run->next)
			kc_restore_api_op(s);
		else
			kc_answer(s->op == KC_RESTORE_FREE ? 0 : -1, 0, 0);
		break;
	case KC_IS_KHO_ENABLED:
	case KC_IS_KHO_BOOT:
	case KC_SCRATCH_OVERLAP:
		kc_query_op(s);
		break;
	case KC_RETRIEVE_SUBTREE: {
		phys_addr_t phys = 0;
		size_t size = 0;
		int rc = run->next ? kho_retrieve_subtree(s->name, &phys, &size) : -ENOENT;

		/* the outputs mean something only on success */
		kc_answer(rc, rc ? 0 : phys, rc ? 0 : size);
		break;
	}
	default:
		kc_old_kernel_op(run, s);
	}
}

static void kc_run_steps(void *arg)
{
	struct kc_run *run = arg;

	if (run->image) {
		/* a foreign image: only the next kernel runs, from the first step */
		kc_cur_op = 0;
		kc_next_kernel(run);
	} else {
		kc_start_kernel(0);
		kho_scratch = kc_arena_page(0);
		kho_scratch_cnt = run->h->n_scratch;
		for (unsigned int i = 0; i < run->h->n_scratch; i++) {
			kho_scratch[i].addr = run->h->scratch[i].a;
			kho_scratch[i].size = run->h->scratch[i].b;
		}
		kho_enable = true;
		kc_record(KC_REC_BOOT, (u64)(long)kho_init(), 0, 0);
		run->enabled = kho_is_enabled();
	}
	for (unsigned long i = run->image ? 1 : 0; i < run->nsteps && !run->handed_over; i++) {
		kc_cur_op = i;
		kc_op_budget();
		kc_step(run, &run->steps[i]);
	}
	if (!run->next && run->enabled && !run->handed_over) {
		kc_cur_op = KC_OP_BOOT; /* the end state, not a kexec */
		kc_record_state();
	}
}

/*
 * Run a packed program (struct kc_header + struct kc_step[]). With an image,
 * steps[0] must be the kexec that boots the next kernel from it. Returns 0,
 * or -1 for a buffer that is not a program; results are read back with
 * kc_answers(), kc_stream(), kc_records(), kc_text_buffer() and
 * kc_snapshot_pages().
 */
int kc_run(const void *program, unsigned long len, const void *image, unsigned long image_len)
{
	struct kc_run run = { 0 };

	if (len < sizeof(struct kc_header) || (len - sizeof(struct kc_header)) % sizeof(struct kc_step))
		return -1;
	run.h = program;
	run.steps = (const struct kc_step *)((const char *)program + sizeof(struct kc_header));
	run.nsteps = (len - sizeof(struct kc_header)) / sizeof(struct kc_step);
	run.image = image;
	run.image_len = image_len;
	if (kc_setup(run.h, run.nsteps))
		return -1;
	kc_reset_globals();
	kc_protected(kc_run_steps, &run);
	return 0;
}

/* the layout Python must agree with */
int kc_page_shift(void)
{
	return PAGE_SHIFT;
}

/* The ABI as this tree's code defines it, for the conformance report. */
void kc_abi_constants(unsigned long long *out)
{
	out[0] = KHO_TREE_MAX_DEPTH;
	out[1] = KHO_TABLE_SIZE_LOG2;
	out[2] = KHO_BITMAP_SIZE_LOG2;
#if KC_KEY_API
	out[3] = KHO_RADIX_KEY_WIDTH;
#else
	out[3] = KHO_ORDER_0_LOG2 + 1; /* order bit of order 0, plus the pfn bits below it */
#endif
	out[4] = sizeof(struct kho_radix_node);
	out[5] = sizeof(struct kho_radix_leaf);
}

/* The kernel's own key encoding, for the key-vector checks (in-domain only:
 * out of domain the kernel's shifts are undefined). */
unsigned long long kc_encode_key(unsigned long long phys, unsigned int order)
{
	return KC_ENCODE_KEY(phys, order);
}

unsigned long long kc_decode_key(unsigned long long key, unsigned int *order)
{
	return KC_DECODE_KEY(key, order);
}
