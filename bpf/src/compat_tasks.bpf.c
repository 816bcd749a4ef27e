// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Compat backend, process side: keep compat_tids (thread id -> agent) exact
 * across task creation, exec and exit, and refuse by SIGKILL the one exec fanotify
 * cannot see: a file on a superblock without a permission mark (memfd via
 * execveat, a filesystem mounted after leash started). Scope inheritance
 * itself is scope.bpf.c's (task storage); this mirrors it by thread id.
 */
#include "compat.h"

char LICENSE[] SEC("license") = "GPL";

#define SIGKILL 9

/*
 * Every new task, not only forks: io_uring's worker and SQPOLL threads are
 * made without the fork tracepoint, and an open punted to a worker reaches
 * the responder under the worker's thread id.
 */
SEC("tp_btf/task_newtask")
int BPF_PROG(compat_newtask, struct task_struct *task, __u64 clone_flags)
{
	__u32 creator = (__u32)bpf_get_current_pid_tgid();
	__u32 *known = bpf_map_lookup_elem(&compat_tids, &creator);
	__u32 agent = known ? *known : leash_agent();
	__u32 tid;

	if (!agent)
		return 0;
	tid = task->pid;
	bpf_map_update_elem(&compat_tids, &tid, &agent, BPF_ANY);
	return 0;
}

/* A task moved into a governed cgroup (the runner, an administrator). */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(compat_attach, struct cgroup *dst, const char *path, struct task_struct *task,
	     bool threadgroup)
{
	int level = dst->level;
	__u32 agent = 0, tid;

	for (int i = 0; i < LEASH_MAX_CGROUP_DEPTH; i++) {
		struct cgroup *cg;
		__u64 id;
		__u32 *a;

		if (i > level)
			break;
		cg = BPF_CORE_READ(dst, ancestors[i]);
		if (!cg)
			break;
		id = BPF_CORE_READ(cg, kn, id);
		a = bpf_map_lookup_elem(&leash_cgroups, &id);
		if (a)
			agent = *a;
	}
	if (!agent)
		return 0;
	tid = task->pid;
	bpf_map_update_elem(&compat_tids, &tid, &agent, BPF_ANY);
	/* The kernel reports a process move for its leader only: the scope of
	 * the whole group is what its other threads find when they exec,
	 * wherever the process has been moved since. */
	if (threadgroup)
		leash_group_enters(task, agent);
	return 0;
}

static __always_inline int compat_marked(struct file *file)
{
	__u32 dev;

	if (!file)
		return 1;
	dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
	return bpf_map_lookup_elem(&compat_fs, &dev) != NULL;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(compat_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	__u32 agent = leash_agent_of(p);
	__u32 tid = p->pid, old = old_pid;

	if (!agent) {
		/* Threads govern() found in the cgroup are known by thread id
		 * only: one that execs after its process was moved out takes
		 * its scope along into the new image. */
		__u32 *known = bpf_map_lookup_elem(&compat_tids, &old);
		struct leash_task *t;

		if (!known)
			return 0;
		agent = *known;
		t = bpf_task_storage_get(&leash_task, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (t)
			t->agent = agent;
		leash_group_enters(p, agent);
	}
	/* A non-leader thread that execs takes over the leader's id. */
	if (old != tid)
		bpf_map_delete_elem(&compat_tids, &old);
	bpf_map_update_elem(&compat_tids, &tid, &agent, BPF_ANY);

	if (compat_marked(bprm->file) && compat_marked(bprm->executable))
		return 0;
	cfg = leash_cfg();
	d.agent = agent;
	d.generation = cfg ? cfg->generation : 0;
	d.action = LEASH_ACT_EXEC;
	d.reason = LEASH_WHY_ANON_EXEC;
	d.denied = 1;
	d.path = bprm->filename;
	/* Past the point of no return: refusing means killing before the new
	 * program runs a single instruction. Audit mode only records. */
	if (!cfg || leash_finish(&d, cfg))
		bpf_send_signal(SIGKILL);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(compat_exit, struct task_struct *p)
{
	__u32 tid = p->pid;
	__u32 *a = bpf_map_lookup_elem(&compat_tids, &tid);

	if (!a)
		return 0;
	bpf_map_update_elem(&compat_gone, &tid, a, BPF_ANY);
	bpf_map_delete_elem(&compat_tids, &tid);
	return 0;
}
