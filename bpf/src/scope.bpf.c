// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Scope tracking, shared by both backends: a child inherits its parent's
 * agent at fork, so leaving the agent's cgroup does not leave the scope.
 * tp_btf programs load on kernels that refuse LSM programs too.
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tp_btf/sched_process_fork")
int BPF_PROG(leash_fork, struct task_struct *parent, struct task_struct *child)
{
	struct leash_task *pt, *ct;
	__u32 agent = leash_agent_of(parent);      /* current is the parent */
	__u32 tgid;

	if (!agent)
		return 0;
	ct = bpf_task_storage_get(&leash_task, child, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (ct) {
		ct->agent = agent;
		pt = bpf_task_storage_get(&leash_task, parent, 0, 0);
		if (pt)
			ct->flags = pt->flags;
	}
	tgid = child->tgid;
	bpf_map_update_elem(&leash_procs, &tgid, &agent, BPF_ANY);
	return 0;
}

/* Resolve a task placed into an agent's cgroup before it execs (the runner). */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(leash_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	leash_agent_of(p);
	return 0;
}

/*
 * A process is gone with its last thread, not with its leader: the leader
 * can exit first (pthread_exit, or when another thread execs and takes
 * over its id), and the process goes on, governed, under the same id; its
 * other threads find their scope here once the leader's storage is gone
 * (leash_group_agent). do_exit() has counted this thread out of
 * signal->live before the tracepoint.
 */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(leash_exit, struct task_struct *p)
{
	__u32 tgid = p->tgid;

	if (!p->signal->live.counter)
		bpf_map_delete_elem(&leash_procs, &tgid);
	return 0;
}
