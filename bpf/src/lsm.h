/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Shared by the lsm backend's objects beyond leash.h (the compat backend's
 * have compat.h).
 */
#ifndef LEASH_LSM_H
#define LEASH_LSM_H

#include "leash.h"

/*
 * Path prefixes no governed agent may open or connect to, whatever the
 * policy says: leash's own files (LsmBackend writes them before attaching).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 64);
	__type(key, struct path_key);           /* owner unused (0) */
	__type(value, __u32);
} leash_protect SEC(".maps");

#endif /* LEASH_LSM_H */
