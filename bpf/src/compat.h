/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Maps shared by the compat backend's objects (compat_tasks, compat_net) on
 * top of leash.h. Same sharing rule as leash.h: each object defines them
 * under the same names and the loader hands every object the same fds.
 */
#ifndef LEASH_COMPAT_H
#define LEASH_COMPAT_H

#include "leash.h"

/*
 * Thread id -> agent for every governed thread. The fanotify responder gets
 * a thread id with each permission event and must know in one lookup
 * whether that thread is governed; the sock_addr programs cannot read task
 * storage. Kept by compat_tasks.bpf.c (fork, exec, exit, cgroup attach) and
 * seeded by Backend.govern() with the threads already in a cgroup.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} compat_tids SEC(".maps");

/*
 * Governed threads that have exited, for the rename/link watcher: its
 * notices arrive after the fact, often after `mv` or `ln` is gone.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} compat_gone SEC(".maps");

/*
 * Superblocks (kernel dev_t, major << 20 | minor) carrying a fanotify
 * permission mark. An exec of a file anywhere else (a memfd, a filesystem
 * mounted after the marks) was never seen by the responder.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} compat_fs SEC(".maps");

/*
 * Mount namespaces (inode numbers) in which a governed process called a
 * mount-family syscall. compat cannot refuse a mount, so the mounter is
 * killed, and so is every governed process found opening files there
 * afterwards (compat_mounts.bpf.c). compat_poison_count[0] > 0 once any is.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} compat_poisoned SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} compat_poison_count SEC(".maps");

/* Reasons beyond leash.h's, decoded by leash/kernel/compat.py. */
#define COMPAT_WHY_MOUNT 32             /* a mount-family syscall by a governed process */
#define COMPAT_WHY_POISONED 33          /* an open in a mount namespace where one happened */
#define COMPAT_WHY_SOCKET 34            /* a socket family no policy can name */

static __always_inline __u32 compat_agent(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 *a = bpf_map_lookup_elem(&compat_tids, &tid);

	if (a)
		return *a;
	/* A thread that was already in a governed cgroup before it was
	 * governed and has not forked or exec'd since. */
	return leash_cgroup_agent();
}

#define SIGKILL 9

/*
 * What compat does where it cannot refuse (tracepoints cannot fail a
 * syscall): record it and, in enforce mode, kill the process on its way
 * back to user space, before it can use the result.
 */
static __always_inline int compat_kill(__u32 agent, __u16 reason, __u32 target)
{
	struct leash_decision d = {};
	struct leash_config *cfg = leash_cfg();

	d.agent = agent;
	d.generation = cfg ? cfg->generation : 0;
	d.action = LEASH_ACT_SELF;
	d.reason = reason;
	d.target = target;
	d.denied = 1;
	if (!cfg || leash_finish(&d, cfg))
		bpf_send_signal(SIGKILL);
	return 0;
}

#endif /* LEASH_COMPAT_H */
