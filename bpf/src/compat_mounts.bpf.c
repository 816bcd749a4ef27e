// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Compat backend, mounts: a governed process that can mount (root, or
 * anyone inside a user namespace of its own) could bind-mount a forbidden
 * directory under an allowed path, or read it through an overlay whose
 * backing files fanotify never reports. compat cannot refuse a mount
 * (tracepoints cannot fail a syscall), so it does the next thing: the
 * mounting process is killed on its way back to user space, its mount
 * namespace is poisoned, and any governed process later entering an
 * open-family syscall there is killed before it can use the result.
 * Ungoverned processes pay one array lookup per open until something is
 * poisoned.
 */
#include "compat.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline __u32 compat_mntns(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
}

static __always_inline int compat_mounting(void)
{
	__u32 agent = compat_agent(), ns, one = 1, zero = 0, *count;

	if (!agent)
		return 0;
	ns = compat_mntns();
	if (bpf_map_update_elem(&compat_poisoned, &ns, &one, BPF_NOEXIST) == 0) {
		count = bpf_map_lookup_elem(&compat_poison_count, &zero);
		if (count)
			__sync_fetch_and_add(count, 1);
	}
	return compat_kill(agent, COMPAT_WHY_MOUNT, 0);
}

static __always_inline int compat_opening(void)
{
	__u32 zero = 0, *count = bpf_map_lookup_elem(&compat_poison_count, &zero);
	__u32 agent, ns;

	if (!count || !*count)
		return 0;
	agent = compat_agent();
	if (!agent)
		return 0;
	ns = compat_mntns();
	if (!bpf_map_lookup_elem(&compat_poisoned, &ns))
		return 0;
	return compat_kill(agent, COMPAT_WHY_POISONED, 0);
}

SEC("tracepoint/syscalls/sys_enter_mount")
int compat_mount(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_move_mount")
int compat_move_mount(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_fsmount")
int compat_fsmount(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_open_tree")
int compat_open_tree(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_mount_setattr")
int compat_mount_setattr(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_pivot_root")
int compat_pivot_root(void *ctx) { return compat_mounting(); }

SEC("tracepoint/syscalls/sys_enter_open")
int compat_open(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_openat")
int compat_openat(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_openat2")
int compat_openat2(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_creat")
int compat_creat(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_open_by_handle_at")
int compat_open_by_handle_at(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_execve")
int compat_execve(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_execveat")
int compat_execveat(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_io_uring_setup")
int compat_io_uring_setup(void *ctx) { return compat_opening(); }

SEC("tracepoint/syscalls/sys_enter_io_uring_enter")
int compat_io_uring_enter(void *ctx) { return compat_opening(); }
