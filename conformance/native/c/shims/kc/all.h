/* Every forwarding header in the staged include tree lands here. */
#ifndef KC_ALL_H
#define KC_ALL_H
#include "types.h"
#define smp_load_acquire(p) (*(p))
#define smp_store_release(p, v) (*(p) = (v))
#include "bitops.h"
#include "kernel.h"
#include "mm.h"
#include "vmalloc.h"
#endif
