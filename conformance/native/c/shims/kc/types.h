/* Kernel base types, compiler annotations and build-time checks. */
#ifndef KC_TYPES_H
#define KC_TYPES_H

#define __KERNEL__ 1
#define BITS_PER_LONG 64
#define BITS_PER_LONG_LONG 64
#define BITS_PER_BYTE 8
#define NULL ((void *)0)

typedef _Bool bool;
enum { false = 0, true = 1 };
typedef unsigned char u8, __u8;
typedef unsigned short u16, __u16;
typedef unsigned int u32, __u32;
typedef unsigned long long u64, __u64;
typedef signed char s8, __s8;
typedef short s16, __s16;
typedef int s32, __s32;
typedef long long s64, __s64;
typedef u16 __be16, __le16;
typedef u32 __be32, __le32;
typedef u64 __be64, __le64;
typedef unsigned long size_t;
typedef long ssize_t;
typedef long ptrdiff_t;
typedef unsigned long uintptr_t;
typedef u64 phys_addr_t;
typedef u64 resource_size_t;
typedef u64 dma_addr_t;
typedef unsigned int gfp_t;
typedef long long loff_t;
typedef u8 uint8_t;
typedef u16 uint16_t;
typedef u32 uint32_t;
typedef u64 uint64_t;
typedef s32 int32_t;
typedef s64 int64_t;

#define U8_MAX ((u8)~0U)
#define U16_MAX ((u16)~0U)
#define U32_MAX ((u32)~0U)
#define S32_MAX ((s32)(U32_MAX >> 1))
#define U64_MAX ((u64)~0ULL)
#define INT_MAX ((int)(~0U >> 1))
#define UINT_MAX (~0U)
#define LONG_MAX ((long)(~0UL >> 1))
#define ULONG_MAX (~0UL)

#define __init
#define __initdata
#define __initconst
#define __ro_after_init
#define __ref
#define __meminit
#define __always_inline inline
#define noinline __attribute__((noinline))
#define __maybe_unused __attribute__((unused))
#define __packed __attribute__((packed))
#define __aligned(x) __attribute__((aligned(x)))
#define __attribute_const__ __attribute__((const))
#define __must_check
#define __user
#define __iomem
#define __force
#define __bitwise
#define likely(x) (x)
#define unlikely(x) (x)
#define READ_ONCE(x) (x)
#define WRITE_ONCE(x, v) ((x) = (v))
#define barrier() do { } while (0)
#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define static_assert(expr, ...) _Static_assert(expr, #expr)
#define BUILD_BUG_ON(cond) ((void)sizeof(char[1 - 2 * !!(cond)]))
#define IS_ENABLED(option) KC_IS_ENABLED_##option
/* The configuration the driver models: KHO built in, debug checks off. */
#define KC_IS_ENABLED_CONFIG_KEXEC_HANDOVER 1
#define KC_IS_ENABLED_CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT 0
#define KC_IS_ENABLED_CONFIG_KEXEC_HANDOVER_DEBUG 0
#define KC_IS_ENABLED_CONFIG_KEXEC_HANDOVER_DEBUGFS 0
#define KC_IS_ENABLED_CONFIG_DEFERRED_STRUCT_PAGE_INIT 0
#define CONFIG_KEXEC_HANDOVER 1

/* Kernel module and init plumbing: nothing to register in userspace. */
#define EXPORT_SYMBOL(sym) extern int kc_export_##sym
#define EXPORT_SYMBOL_GPL(sym) extern int kc_export_##sym
#define early_param(name, fn) extern int kc_early_param_##fn
#define fs_initcall(fn) extern int kc_initcall_##fn
#define late_initcall(fn) extern int kc_initcall_##fn
#define core_initcall(fn) extern int kc_initcall_##fn

#define min(x, y) ((x) < (y) ? (x) : (y))
#define max(x, y) ((x) > (y) ? (x) : (y))
#define min_t(t, x, y) ((t)(x) < (t)(y) ? (t)(x) : (t)(y))
#define max_t(t, x, y) ((t)(x) > (t)(y) ? (t)(x) : (t)(y))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
/* power-of-two y only, as in the kernel */
#define round_up(x, y) ((((x) - 1) | ((__typeof__(x))((y) - 1))) + 1)
#define SZ_1K 0x400
#define SZ_64K 0x10000
#define SZ_1M 0x100000
#define SZ_1G 0x40000000

#endif
