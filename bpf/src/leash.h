/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Shared by every leash BPF object: the decision tables (docs/tables.md), the
 * scope maps, the event ring buffer (docs/bpf.md) and the helpers the hooks
 * use. Each object defines these maps under the same names; the loader
 * creates them once and hands the same fds to every later object
 * (bpf_map__reuse_fd), so all objects share one set.
 */
#ifndef LEASH_H
#define LEASH_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define EPERM 1
#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define AF_NETLINK 16
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

#define LEASH_PATH_BYTES 252            /* path bytes in a path_key */
#define LEASH_EVENT_PATH 256            /* path bytes carried by an event */
#define LEASH_D_PATH_MAX 4096           /* PATH_MAX: bpf_d_path fails beyond */
#define LEASH_NAME_MAX 255              /* one path component */
#define LEASH_MAX_CGROUP_DEPTH 16       /* ancestor levels searched for a governed cgroup */
#define LEASH_DEDUP_WINDOW_NS 1000000000ULL

/* path_val.allow bits (docs/tables.md) */
#define ALLOW_READ_FILE  (1 << 0)
#define ALLOW_WRITE_FILE (1 << 1)
#define ALLOW_EXEC       (1 << 2)
#define ALLOW_READ_DIR   (1 << 3)
#define ALLOW_WRITE_DIR  (1 << 4)

/* ------------------------------------------------------------ decision tables */

struct path_key {
	__u32 prefixlen;
	__u32 owner;                    /* big-endian generation << 31 | agent */
	__u8 path[LEASH_PATH_BYTES];
} __attribute__((packed));

struct path_val {
	__u32 class_id;
	__u32 allow;
} __attribute__((packed));

struct addr_key {
	__u32 prefixlen;
	__u32 owner;
	__u8 family;                    /* 4 or 6 */
	__u8 addr[16];
} __attribute__((packed));

struct addr_val {
	__u32 net_class;
} __attribute__((packed));

struct port_key {
	__u32 prefixlen;
	__u32 owner;                    /* big-endian generation << 31 | net_class */
	__u8 proto;
	__u8 port[2];                   /* big-endian */
} __attribute__((packed));

struct port_val {
	__u32 class_id;                 /* verdict id */
	__u32 allow;
} __attribute__((packed));

struct leash_config {
	__u32 generation;
	__u32 mode;                     /* 0 enforce, 1 audit */
	__u32 daemon_tgid;
	__u32 flags;
};

#define LEASH_MODE_AUDIT 1

/* Sized by the loader before load (bpf_map__set_max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct path_key);
	__type(value, struct path_val);
} leash_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct addr_key);
	__type(value, struct addr_val);
} leash_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, struct port_val);
} leash_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct leash_config);
} leash_config SEC(".maps");

static __always_inline struct leash_config *leash_cfg(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&leash_config, &zero);
}

static __always_inline __u32 leash_owner(__u32 generation, __u32 id)
{
	return bpf_htonl((generation & 1) << 31 | id);
}

/* ------------------------------------------------------------------- scope */

/*
 * A governed cgroup (the root of an agent's subtree) -> agent id.
 * Written by Backend.govern().
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} leash_cgroups SEC(".maps");

/*
 * A cached "not governed" answer holds for one epoch, the sum of two
 * counters: [0] bumped by userspace after every change to leash_cgroups,
 * [1] by the kernel when a running process with several threads enters
 * scope through its cgroup (leash_group_enters). Each only grows, so an
 * answer from before either bump is recomputed.
 */
#define LEASH_EPOCH_USER 0
#define LEASH_EPOCH_KERNEL 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} leash_scope_epoch SEC(".maps");

/*
 * Per-task scope, inherited at fork (scope.bpf.c): once governed, a task
 * stays governed wherever it moves. For tasks found not governed, the cgroup
 * and epoch of that answer, so the next check is one lookup.
 */
struct leash_task {
	__u32 agent;
	__u32 epoch;
	__u64 cgroup;
	__u32 flags;
	__u32 reserved;
};

#define LEASH_TASK_LOADER 1             /* exec'd an ELF interpreter directly */

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct leash_task);
} leash_task SEC(".maps");

/*
 * tgid -> agent for every governed process, until its last thread exits:
 * the scope of a thread group that outlives its leader's task storage (the
 * leader exits first, or another thread execs and takes over its id), and
 * for userspace (Backend.agent_of_pid: the MCP service names a client's
 * agent by it). Kept by scope.bpf.c.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} leash_procs SEC(".maps");

/* The nearest governed ancestor of the current task's cgroup, 0 if none. */
static __always_inline __u32 leash_cgroup_agent(void)
{
	__u32 agent = 0;

	for (int level = 1; level < LEASH_MAX_CGROUP_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		__u32 *a;

		if (!id)
			break;
		a = bpf_map_lookup_elem(&leash_cgroups, &id);
		if (a)
			agent = *a;
	}
	return agent;
}

/*
 * A thread with no scope of its own takes its thread group's: io_uring's
 * worker and SQPOLL threads are made by create_io_thread(), outside the
 * kernel_clone() path the fork tracepoint sits on, and a thread of a process
 * moved into an agent's cgroup may not have asked yet. The leader's storage
 * says, or leash_procs once the leader is gone (after a non-leader exec the
 * exec'ing thread is the leader, and the old leader's storage went with it).
 */
static __always_inline __u32 leash_group_agent(struct task_struct *task)
{
	struct task_struct *leader = task->group_leader;
	struct leash_task *lt;
	__u32 tgid = task->tgid, *a;

	if (leader && leader != task) {
		lt = bpf_task_storage_get(&leash_task, leader, 0, 0);
		if (lt && lt->agent)
			return lt->agent;
	}
	a = bpf_map_lookup_elem(&leash_procs, &tgid);
	return a ? *a : 0;
}

static __always_inline __u32 leash_epoch(void)
{
	__u32 user = LEASH_EPOCH_USER, kernel = LEASH_EPOCH_KERNEL;
	__u32 *u = bpf_map_lookup_elem(&leash_scope_epoch, &user);
	__u32 *k = bpf_map_lookup_elem(&leash_scope_epoch, &kernel);

	return (u ? *u : 0) + (k ? *k : 0);
}

/*
 * A running process enters scope as a whole (through its cgroup): list it,
 * and if it has other threads, drop every cached "not governed" answer, for
 * one of them may hold one from before and be moved back where it was.
 */
static __always_inline void leash_group_enters(struct task_struct *task, __u32 agent)
{
	__u32 tgid = task->tgid, kernel = LEASH_EPOCH_KERNEL, *k;

	bpf_map_update_elem(&leash_procs, &tgid, &agent, BPF_ANY);
	if (BPF_CORE_READ(task, signal, nr_threads) > 1) {
		k = bpf_map_lookup_elem(&leash_scope_epoch, &kernel);
		if (k)
			__sync_fetch_and_add(k, 1);
	}
}

/*
 * The agent the current task belongs to, 0 when out of scope. Out-of-scope
 * tasks pay one task-storage lookup plus the epoch read once their answer is
 * cached.
 */
static __always_inline __u32 leash_agent_of(struct task_struct *task)
{
	struct leash_task *t = bpf_task_storage_get(&leash_task, task, 0, 0);
	__u64 cgroup;
	__u32 epoch, agent;

	if (t && t->agent)
		return t->agent;
	cgroup = bpf_get_current_cgroup_id();
	epoch = leash_epoch();
	if (t && t->cgroup == cgroup && t->epoch == epoch)
		return 0;
	agent = leash_group_agent(task);
	if (!agent) {
		agent = leash_cgroup_agent();
		if (agent)
			leash_group_enters(task, agent);
	}
	t = bpf_task_storage_get(&leash_task, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (t) {
		t->agent = agent;
		t->cgroup = cgroup;
		t->epoch = epoch;
	}
	return agent;
}

static __always_inline __u32 leash_agent(void)
{
	return leash_agent_of(bpf_get_current_task_btf());
}

/* ------------------------------------------------------------------ events */

enum leash_action {
	LEASH_ACT_READ = 1,
	LEASH_ACT_WRITE = 2,
	LEASH_ACT_EXEC = 3,
	LEASH_ACT_CONNECT = 4,
	LEASH_ACT_SELF = 5,             /* self-protection and bypass guards */
};

enum leash_reason {
	LEASH_WHY_POLICY = 0,           /* the compiled Cedar verdict */
	LEASH_WHY_D_PATH = 1,           /* bpf_d_path failed (too long, error) */
	LEASH_WHY_NOT_ABSOLUTE = 2,     /* pseudo file, no absolute path */
	LEASH_WHY_TABLE_MISS = 3,       /* no table entry: cannot happen with a complete table */
	LEASH_WHY_FAMILY = 4,           /* address family not covered */
	LEASH_WHY_PROTOCOL = 5,         /* transport not TCP or UDP */
	LEASH_WHY_ANON_EXEC = 6,        /* exec of a file with no name (memfd, deleted) */
	LEASH_WHY_LOADER = 7,           /* executable mapping by a directly run ELF interpreter */
	LEASH_WHY_BPF = 8,
	LEASH_WHY_PTRACE = 9,
	LEASH_WHY_SIGNAL = 10,
	LEASH_WHY_CGROUP = 11,          /* write open on a cgroup filesystem */
	LEASH_WHY_PROTECTED = 12,       /* leash's own files */
	LEASH_WHY_LINK = 13,
	LEASH_WHY_RENAME = 14,
	LEASH_WHY_MPROTECT = 15,
	LEASH_WHY_URING = 16,           /* io_uring request under other credentials */
	LEASH_WHY_MOUNT = 17,           /* mount, move_mount, fsconfig create, pivot_root */
	LEASH_WHY_MOUNT_NS = 18,        /* reached through a mount outside the task's namespace */
	LEASH_WHY_CHROOT = 19,          /* chroot, setns into a mount namespace */
	LEASH_WHY_ABSTRACT = 20,        /* unix socket with an abstract name: no path to judge */
	LEASH_WHY_SOCKET = 21,          /* socket family or type no policy can name (packet, raw, vsock...) */
	LEASH_WHY_TASK = 22,            /* priority, scheduling or limits of a process outside the agent */
	LEASH_WHY_CAPABILITY = 23,      /* kernel modules, raw I/O, device nodes, reboot (target: the capability) */
};

/* leash_event.target of a file decision: how the file was reached. */
#define LEASH_VIA_UNIX 1                /* connect or send to the unix socket bound there */

/* docs/bpf.md describes this record; leash/kernel/lsm.py decodes it. */
struct leash_event {
	__u64 ktime_ns;                 /* CLOCK_BOOTTIME */
	__u32 tgid;
	__u32 pid;
	__u32 ppid;
	__u32 uid;
	__u32 agent;
	__u32 generation;
	__u32 class_id;                 /* path class (file/exec) or verdict id (net) */
	__u32 count;                    /* identical allows folded into this one, plus one */
	__u32 target;                   /* self-protection: tgid, bpf command or signal */
	__u16 action;
	__u16 reason;
	__u8 denied;                    /* the verdict was deny */
	__u8 enforced;                  /* and the operation was refused (enforce mode) */
	__u8 is_dir;
	__u8 family;                    /* 4 or 6 */
	__u8 proto;
	__u8 truncated;                 /* path longer than the event carries */
	__u16 port;                     /* host order */
	__u8 addr[16];
	char comm[16];
	char path[LEASH_EVENT_PATH];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} leash_events SEC(".maps");

enum leash_stat {
	LEASH_STAT_LOST_DENY = 0,       /* deny refused but its record lost */
	LEASH_STAT_LOST_ALLOW = 1,      /* allow refused because it could not be recorded */
	LEASH_STAT_LOST_AUDIT = 2,      /* audit-mode record lost (nothing refused) */
	LEASH_STAT_MAX = 4,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LEASH_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} leash_stats SEC(".maps");

/* Identical allows (same process, action and resource) within a window. */
struct leash_dedup_key {
	__u32 agent;
	__u32 tgid;
	__u32 class_id;
	__u16 action;
	__u8 is_dir;
	__u8 family;
	__u8 proto;
	__u8 pad;
	__u16 port;
	__u8 addr[16];
	char path[LEASH_EVENT_PATH];
};

struct leash_dedup_val {
	__u64 emitted_ns;
	__u32 suppressed;
	__u32 generation;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct leash_dedup_key);
	__type(value, struct leash_dedup_val);
} leash_dedup SEC(".maps");

/* Per-CPU working space: keys and paths are too big for the 512-byte stack. */
struct leash_scratch {
	struct path_key key;
	struct leash_dedup_key dedup;
	char buf[LEASH_D_PATH_MAX];
	/* leash_walk_path builds a path backwards from walk[LEASH_D_PATH_MAX - 1];
	 * the tail lets a bounded copy start anywhere before it. */
	char walk[LEASH_D_PATH_MAX + LEASH_NAME_MAX + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct leash_scratch);
} leash_scratch SEC(".maps");

static __always_inline struct leash_scratch *leash_scratch_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&leash_scratch, &zero);
}

static __always_inline void leash_stat_inc(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&leash_stats, &stat);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* What a hook decided, before it is recorded. */
struct leash_decision {
	__u32 agent;
	__u32 generation;
	__u32 class_id;
	__u32 target;
	__u16 action;
	__u16 reason;
	__u8 denied;
	__u8 always;                    /* self-protection: refused in audit mode too */
	__u8 is_dir;
	__u8 family;
	__u16 port;
	__u8 proto;
	const __u8 *addr;               /* 16 bytes, or NULL */
	const char *path;               /* kernel buffer holding a NUL-terminated path, or NULL */
};

static __always_inline void leash_fill_event(struct leash_event *ev, const struct leash_decision *d,
					     __u32 count, int enforced)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	ev->ktime_ns = bpf_ktime_get_boot_ns();
	ev->tgid = pid_tgid >> 32;
	ev->pid = (__u32)pid_tgid;
	ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev->uid = (__u32)bpf_get_current_uid_gid();
	ev->agent = d->agent;
	ev->generation = d->generation;
	ev->class_id = d->class_id;
	ev->count = count;
	ev->target = d->target;
	ev->action = d->action;
	ev->reason = d->reason;
	ev->denied = d->denied;
	ev->enforced = enforced;
	ev->is_dir = d->is_dir;
	ev->family = d->family;
	ev->proto = d->proto;
	ev->port = d->port;
	ev->truncated = 0;
	if (d->addr)
		bpf_probe_read_kernel(ev->addr, sizeof(ev->addr), d->addr);
	else
		__builtin_memset(ev->addr, 0, sizeof(ev->addr));
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	ev->path[0] = 0;
	if (d->path) {
		long n = bpf_probe_read_kernel_str(ev->path, sizeof(ev->path), d->path);
		if (n == sizeof(ev->path))
			ev->truncated = 1;
	}
}

static __always_inline int leash_emit(const struct leash_decision *d, __u32 count, int enforced)
{
	struct leash_event *ev = bpf_ringbuf_reserve(&leash_events, sizeof(*ev), 0);

	if (!ev)
		return -1;
	leash_fill_event(ev, d, count, enforced);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/*
 * Record a decision and return the hook's answer. Audit mode refuses
 * nothing but self-protection (d->always). Denies are always sent
 * (their loss is counted); allows are folded per (process, action, resource)
 * for a window, and an allow that should be recorded but cannot be is
 * refused in enforce mode: nothing happens unrecorded (DESIGN.md 1.5).
 */
static __always_inline int leash_finish(const struct leash_decision *d, const struct leash_config *cfg)
{
	int audit = cfg->mode == LEASH_MODE_AUDIT && !d->always;
	struct leash_scratch *s;
	struct leash_dedup_key *k;
	struct leash_dedup_val *v, nv = {};
	__u64 now;
	__u32 count = 1;

	if (d->denied) {
		if (leash_emit(d, 1, !audit))
			leash_stat_inc(audit ? LEASH_STAT_LOST_AUDIT : LEASH_STAT_LOST_DENY);
		return audit ? 0 : -EPERM;
	}

	s = leash_scratch_get();
	if (!s)
		return audit ? 0 : -EPERM;
	k = &s->dedup;
	__builtin_memset(k, 0, sizeof(*k));
	k->agent = d->agent;
	k->tgid = bpf_get_current_pid_tgid() >> 32;
	k->class_id = d->class_id;
	k->action = d->action;
	k->is_dir = d->is_dir;
	k->family = d->family;
	k->proto = d->proto;
	k->port = d->port;
	if (d->addr)
		bpf_probe_read_kernel(k->addr, sizeof(k->addr), d->addr);
	if (d->path)
		bpf_probe_read_kernel_str(k->path, sizeof(k->path), d->path);

	now = bpf_ktime_get_boot_ns();
	v = bpf_map_lookup_elem(&leash_dedup, k);
	if (v && v->generation == d->generation && now - v->emitted_ns < LEASH_DEDUP_WINDOW_NS) {
		__sync_fetch_and_add(&v->suppressed, 1);
		return 0;
	}
	if (v && v->generation == d->generation)
		count += v->suppressed;
	if (leash_emit(d, count, 0)) {
		leash_stat_inc(audit ? LEASH_STAT_LOST_AUDIT : LEASH_STAT_LOST_ALLOW);
		return audit ? 0 : -EPERM;
	}
	nv.emitted_ns = now;
	nv.generation = d->generation;
	bpf_map_update_elem(&leash_dedup, k, &nv, BPF_ANY);
	return 0;
}

/*
 * Refuse what no policy can allow: `d` says what (action, reason, details);
 * recorded as a deny of `agent` under the live generation. Audit mode lets
 * it happen unless d->always.
 */
static __always_inline int leash_deny(__u32 agent, struct leash_decision *d)
{
	struct leash_config *cfg = leash_cfg();

	if (!cfg)
		return -EPERM;
	d->agent = agent;
	d->generation = cfg->generation;
	d->denied = 1;
	return leash_finish(d, cfg);
}

/*
 * Refuse what a governed agent may not do whatever the policy says, in
 * audit mode too; `path` (a kernel string, or NULL) names the object.
 */
static __always_inline int leash_refuse(__u32 agent, __u16 reason, __u32 target, const char *path)
{
	struct leash_decision d = {
		.action = LEASH_ACT_SELF, .reason = reason, .target = target, .path = path, .always = 1,
	};

	return leash_deny(agent, &d);
}

/* --------------------------------------------------------- path decisions */

/*
 * bpf_d_path names a file by walking up to the root of the mount namespace
 * its mount belongs to. For a mount outside the current task's namespace
 * (a detached copy from open_tree(OPEN_TREE_CLONE) or fsmount(), a tree
 * detached by umount -l, another process's namespace reached through
 * /proc/PID/root) that name is not the file's name here: the secrets
 * directory cloned by open_tree reads as "/". Kernel-internal mounts
 * (pipes, sockets, memfd: MNT_NS_INTERNAL, an error pointer) are left to
 * the other rules.
 */
static __always_inline int leash_foreign_mount(const struct path *path)
{
	struct mount *m = container_of(path->mnt, struct mount, mnt);
	struct mnt_namespace *ns = BPF_CORE_READ(m, mnt_ns);
	struct task_struct *task = bpf_get_current_task_btf();

	if ((unsigned long)ns >= (unsigned long)-4095)
		return 0;
	return ns != task->nsproxy->mnt_ns;
}

/*
 * Fill the scratch key with the NUL-terminated absolute path `str` (`len`
 * bytes with the NUL) for d's agent and generation; d->path names it.
 */
static __always_inline void leash_path_key(struct leash_scratch *s, const char *str, long len,
					   struct leash_decision *d)
{
	/* The first 252 bytes; a longer path has no NUL and so matches only
	 * prefix entries, which is what docs/tables.md asks. */
	bpf_probe_read_kernel(s->key.path, sizeof(s->key.path), str);
	if (d->is_dir && len > 2 && len < LEASH_PATH_BYTES) {
		/* len counts the NUL: the path ends at len - 2. The masks are
		 * asm so that clang, knowing len < 252, cannot drop the bound the
		 * verifier needs. */
		__u64 slash = len - 1, nul = len;

		asm volatile("%0 &= 0xff" : "+r"(slash));
		asm volatile("%0 &= 0xff" : "+r"(nul));
		s->key.path[slash] = '/';
		s->key.path[nul] = 0;
	}
	s->key.prefixlen = 32 + 8 * LEASH_PATH_BYTES;
	s->key.owner = leash_owner(d->generation, d->agent);
	d->path = str;
}

/*
 * Resolve `path` with bpf_d_path into the scratch key and look it up for the
 * current generation. Returns the table value, or NULL with d->reason set
 * (a file on a mount outside the task's namespace included: its name is
 * not to be trusted). Used by hooks whose kernel function is on
 * bpf_d_path's allow list.
 */
static __always_inline struct path_val *leash_path_lookup(struct leash_scratch *s, const struct path *path,
							  struct leash_decision *d)
{
	/* bpf_d_path takes a non-const path; it only reads it */
	long len = bpf_d_path((struct path *)path, s->buf, sizeof(s->buf));
	struct path_val *v;

	if (len <= 0) {
		d->reason = LEASH_WHY_D_PATH;
		return NULL;
	}
	if (s->buf[0] != '/') {
		d->reason = LEASH_WHY_NOT_ABSOLUTE;
		return NULL;
	}
	leash_path_key(s, s->buf, len, d);
	if (leash_foreign_mount(path)) {
		d->reason = LEASH_WHY_MOUNT_NS;
		return NULL;
	}
	v = bpf_map_lookup_elem(&leash_paths, &s->key);
	if (!v)
		d->reason = LEASH_WHY_TABLE_MISS;
	return v;
}

/* ------------------------------------------------------ network decisions */

/*
 * The Cedar verdict for (agent, destination, transport) from the compiled
 * tables. `addr` is 16 bytes, IPv4 in the first 4; an IPv4-mapped IPv6
 * address is rewritten in place to its IPv4 form and looked up as such,
 * exactly what Cedar was asked about. Returns 1 allow, 0 deny; fills
 * d->class_id (verdict id), the destination fields and, for a miss,
 * d->reason. Shared with the compat backend's cgroup sock_addr programs.
 *
 * When names learnt from DNS arrive (DESIGN.md section 7), their
 * (agent, address) -> net class table is consulted here first.
 */
static __always_inline int leash_net_decide(struct leash_decision *d, __u8 family, __u8 *addr,
					    __u8 proto, __u16 port)
{
	struct addr_key ak = {};
	struct port_key pk = {};
	struct addr_val *av;
	struct port_val *pv;

	if (family == 6 && !(addr[0] | addr[1] | addr[2] | addr[3] | addr[4] | addr[5] |
			     addr[6] | addr[7] | addr[8] | addr[9]) &&
	    addr[10] == 0xff && addr[11] == 0xff) {
		family = 4;
		addr[0] = addr[12];
		addr[1] = addr[13];
		addr[2] = addr[14];
		addr[3] = addr[15];
		__builtin_memset(addr + 4, 0, 12);
	}
	d->family = family;
	d->proto = proto;
	d->port = port;
	d->addr = addr;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		d->reason = LEASH_WHY_PROTOCOL;
		return 0;
	}
	__builtin_memcpy(ak.addr, addr, 16);
	ak.prefixlen = 32 + 8 + (family == 4 ? 32 : 128);
	ak.owner = leash_owner(d->generation, d->agent);
	ak.family = family;
	av = bpf_map_lookup_elem(&leash_addrs, &ak);
	if (!av) {
		d->reason = LEASH_WHY_TABLE_MISS;
		return 0;
	}
	pk.prefixlen = 32 + 8 + 16;
	pk.owner = leash_owner(d->generation, av->net_class);
	pk.proto = proto;
	pk.port[0] = port >> 8;
	pk.port[1] = port & 0xff;
	pv = bpf_map_lookup_elem(&leash_ports, &pk);
	if (!pv) {
		d->reason = LEASH_WHY_TABLE_MISS;
		return 0;
	}
	d->class_id = pv->class_id;
	return pv->allow != 0;
}

#endif /* LEASH_H */
