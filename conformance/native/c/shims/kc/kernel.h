/* Warnings, printk, locking, strings: recorded or no-ops in userspace. */
#ifndef KC_KERNEL_H
#define KC_KERNEL_H

#include "types.h"
#include "kc_runtime.h"

/* WARN*: recorded with their site, never fatal. The site id makes
 * WARN_ON_ONCE "once per boot of a kernel" (the runtime resets it). */
#define WARN_ON(cond) kc_warn(!!(cond), __COUNTER__, 0, __func__, __LINE__, #cond)
#define WARN_ON_ONCE(cond) kc_warn(!!(cond), __COUNTER__, 1, __func__, __LINE__, #cond)
#define WARN(cond, ...) kc_warn(!!(cond), __COUNTER__, 0, __func__, __LINE__, #cond)
#define WARN_ONCE(cond, ...) kc_warn(!!(cond), __COUNTER__, 1, __func__, __LINE__, #cond)
#define BUG() kc_bug(__func__, __LINE__, "BUG")
#define BUG_ON(cond) do { if (cond) kc_bug(__func__, __LINE__, #cond); } while (0)
#define might_sleep() do { } while (0)

#ifndef pr_fmt
#define pr_fmt(fmt) fmt
#endif
#define KERN_ERR "<3>"
#define KERN_WARNING "<4>"
#define KERN_NOTICE "<5>"
#define KERN_INFO "<6>"
#define KERN_DEBUG "<7>"
#define printk(...) kc_printk(__VA_ARGS__)
#define pr_err(fmt, ...) kc_printk(KERN_ERR pr_fmt(fmt), ##__VA_ARGS__)
#define pr_warn(fmt, ...) kc_printk(KERN_WARNING pr_fmt(fmt), ##__VA_ARGS__)
#define pr_notice(fmt, ...) kc_printk(KERN_NOTICE pr_fmt(fmt), ##__VA_ARGS__)
#define pr_info(fmt, ...) kc_printk(KERN_INFO pr_fmt(fmt), ##__VA_ARGS__)
#define pr_debug(fmt, ...) kc_printk(KERN_DEBUG pr_fmt(fmt), ##__VA_ARGS__)

/* Locks: the driver is single-threaded. guard(mutex)(&l) becomes a no-op. */
struct mutex { int kc_unused; };
struct lock_class_key { int kc_unused; };
#define __MUTEX_INITIALIZER(name) { 0 }
#define DEFINE_MUTEX(name) struct mutex name = { 0 }
#define mutex_init(m) ((void)(m))
#define mutex_lock(m) ((void)(m))
#define mutex_unlock(m) ((void)(m))
#define lockdep_set_class(lock, key) ((void)(lock), (void)(key))
#define guard(name) kc_guard_##name
#define kc_guard_mutex(lock) ((void)(lock))
#define scoped_guard(name, lock) if (((void)(lock), 1))

/* errno values: kc_contract.h (one definition with the model's); ERR_PTR */
#define MAX_ERRNO 4095
#define IS_ERR_VALUE(x) ((unsigned long)(void *)(x) >= (unsigned long)-MAX_ERRNO)
static inline void *ERR_PTR(long error) { return (void *)error; }
static inline long PTR_ERR(const void *ptr) { return (long)ptr; }
static inline bool IS_ERR(const void *ptr) { return IS_ERR_VALUE((unsigned long)ptr); }
static inline bool IS_ERR_OR_NULL(const void *ptr) { return !ptr || IS_ERR(ptr); }

/* strings: libc's, by their kernel names */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t n);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
char *strrchr(const char *s, int c);
#define strscpy(d, s, n) kc_strscpy((d), (s), (n))
int kstrtobool(const char *s, bool *res);
int kstrtouint(const char *s, unsigned int base, unsigned int *res);
unsigned long long memparse(const char *ptr, char **retptr);

/* unaligned access, as in <linux/unaligned.h> for the u64 KHO reads */
static inline u64 kc_get_unaligned_u64(const void *p)
{
	u64 v;

	memcpy(&v, p, sizeof(v));
	return v;
}
#define get_unaligned(p) kc_get_unaligned_u64(p)

/* utsname */
#define __NEW_UTS_LEN 64
struct new_utsname {
	char sysname[__NEW_UTS_LEN + 1];
	char nodename[__NEW_UTS_LEN + 1];
	char release[__NEW_UTS_LEN + 1];
	char version[__NEW_UTS_LEN + 1];
	char machine[__NEW_UTS_LEN + 1];
	char domainname[__NEW_UTS_LEN + 1];
};
struct uts_namespace { struct new_utsname name; };
extern struct uts_namespace init_uts_ns;

/* byte order (x86-64 / arm64 little endian) for <linux/libfdt_env.h> */
#define be16_to_cpu(x) __builtin_bswap16(x)
#define be32_to_cpu(x) __builtin_bswap32(x)
#define be64_to_cpu(x) __builtin_bswap64(x)
#define cpu_to_be16(x) __builtin_bswap16(x)
#define cpu_to_be32(x) __builtin_bswap32(x)
#define cpu_to_be64(x) __builtin_bswap64(x)

/* lists (only declared by KHO's debugfs state) */
struct list_head { struct list_head *next, *prev; };

/* crash dump: the driver never runs a kdump kernel */
#define is_kdump_kernel() 0

/* kmemleak, kasan */
#define kmemleak_ignore_phys(phys) ((void)(phys))

#endif
