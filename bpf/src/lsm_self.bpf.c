// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Self-protection, whatever the policy says and in audit mode too: a
 * governed agent cannot use bpf(), nor trace, signal or re-prioritise any
 * process outside its own agent (the leash daemon, the host's other
 * processes, other agents), nor run io_uring requests under other credentials (leash tells a
 * filesystem's own credential overrides from the task's by that). Tracing a
 * process outside the scope would be a way out of it: code injected there
 * runs ungoverned. Nor can it use the capabilities that act below any
 * policy (see leash_capable). Cgroup writes and leash's own files are
 * guarded in lsm_file.bpf.c, mounts in lsm_mount.bpf.c.
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

#define PTRACE_MODE_ATTACH 0x02

static __always_inline int leash_is_daemon(struct task_struct *p)
{
	struct leash_config *cfg = leash_cfg();
	return cfg && cfg->daemon_tgid && p->tgid == cfg->daemon_tgid;
}

/*
 * Whether `p` is known to belong to `agent`: its own scope, or its thread
 * group's. A process not yet seen by any hook since it was moved into the
 * agent's cgroup counts as outside (refusing is the safe side).
 */
static __always_inline int leash_in_agent(struct task_struct *p, __u32 agent)
{
	struct leash_task *t = bpf_task_storage_get(&leash_task, p, 0, 0);
	__u32 tgid = p->tgid, *a;

	if (t && t->agent)
		return t->agent == agent;
	a = bpf_map_lookup_elem(&leash_procs, &tgid);
	return a && *a == agent;
}

SEC("lsm/bpf")
int BPF_PROG(leash_bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_BPF, cmd, NULL) : 0;
}

/*
 * Attaching (ptrace, /proc/PID/mem, process_vm_writev, pidfd_getfd) to
 * anything outside the agent, and any access to the daemon. Reading another
 * process (/proc/PID/environ, maps, fd) opens files, which the policy judges.
 */
SEC("lsm/ptrace_access_check")
int BPF_PROG(leash_ptrace, struct task_struct *child, unsigned int mode)
{
	__u32 agent;

	if (!(mode & PTRACE_MODE_ATTACH) && !leash_is_daemon(child))
		return 0;
	agent = leash_agent();
	if (!agent || leash_in_agent(child, agent))
		return 0;
	return leash_refuse(agent, LEASH_WHY_PTRACE, child->tgid, NULL);
}

SEC("lsm/task_kill")
int BPF_PROG(leash_task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
	     const struct cred *cred)
{
	__u32 agent;

	if (!sig)
		return 0;       /* an existence probe changes nothing */
	agent = leash_agent();
	if (!agent || leash_in_agent(p, agent))
		return 0;
	return leash_refuse(agent, LEASH_WHY_SIGNAL, p->tgid, NULL);
}

/*
 * Signals the kernel sends for the agent later: the owner of a file gets
 * SIGIO (or the signal F_SETSIG names) when I/O is possible there. By the
 * time it goes out, the hook that sees it (file_send_sigiotask) cannot tell
 * who set the owner, so the owner is judged when it is set. fcntl(F_SETOWN)
 * passes it by value: a process of the agent (listed in leash_procs, or the
 * caller itself) or a process group whose leader is one may be the owner.
 * F_SETOWN_EX and ioctl(FIOSETOWN / SIOCSPGRP) pass it through user memory,
 * which another thread can change between this check and the kernel's own
 * copy, so governed agents may not use them.
 */
#define F_SETOWN 8
#define F_SETOWN_EX 15
#define FIOSETOWN 0x8901
#define SIOCSPGRP 0x8902

SEC("lsm/file_fcntl")
int BPF_PROG(leash_file_fcntl, struct file *file, unsigned int cmd, unsigned long arg)
{
	__u64 id;
	__u32 agent, target, *a;
	int who;

	if (cmd != F_SETOWN && cmd != F_SETOWN_EX)
		return 0;
	agent = leash_agent();
	if (!agent)
		return 0;
	if (cmd == F_SETOWN_EX)
		return leash_refuse(agent, LEASH_WHY_SIGNAL, 0, NULL);
	who = (int)arg;
	if (who == 0)
		return 0;       /* no owner: no signal */
	target = who < 0 ? -who : who;
	id = bpf_get_current_pid_tgid();
	if (who > 0 && (target == (__u32)id || target == id >> 32))
		return 0;
	a = bpf_map_lookup_elem(&leash_procs, &target);
	if (a && *a == agent)
		return 0;
	return leash_refuse(agent, LEASH_WHY_SIGNAL, target, NULL);
}

SEC("lsm/file_ioctl")
int BPF_PROG(leash_file_ioctl, struct file *file, unsigned int cmd, unsigned long arg)
{
	__u32 agent;

	if (cmd != FIOSETOWN && cmd != SIOCSPGRP)
		return 0;
	agent = leash_agent();
	return agent ? leash_refuse(agent, LEASH_WHY_SIGNAL, 0, NULL) : 0;
}

/*
 * Changing another process: its priority, I/O priority, scheduling policy
 * or CPU affinity, its resource limits (prlimit: a CPU-time limit of zero
 * kills it). Within the agent, anything the kernel allows.
 */
static __always_inline int leash_task_change(struct task_struct *p)
{
	__u32 agent = leash_agent();

	if (!agent || leash_in_agent(p, agent))
		return 0;
	return leash_refuse(agent, LEASH_WHY_TASK, p->tgid, NULL);
}

SEC("lsm/task_setnice")
int BPF_PROG(leash_task_setnice, struct task_struct *p, int nice)
{
	return leash_task_change(p);
}

SEC("lsm/task_setioprio")
int BPF_PROG(leash_task_setioprio, struct task_struct *p, int ioprio)
{
	return leash_task_change(p);
}

SEC("lsm/task_setscheduler")
int BPF_PROG(leash_task_setscheduler, struct task_struct *p)
{
	return leash_task_change(p);
}

SEC("lsm/task_setrlimit")
int BPF_PROG(leash_task_setrlimit, struct task_struct *p, unsigned int resource, struct rlimit *new_rlim)
{
	return leash_task_change(p);
}

/*
 * Capabilities a governed task may not use, whatever it holds (the runner
 * already drops them from a command's bounding set; an agent made of
 * processes leash did not start may still hold them): chroot(2) and
 * setns(2) into a mount namespace (CAP_SYS_CHROOT) change what every path
 * names; loading kernel code (SYS_MODULE), raw memory and I/O ports
 * (SYS_RAWIO) and device nodes (MKNOD: a disk's node made under an allowed
 * path) act below any path a policy names; SYS_BOOT reboots or kexecs the
 * host. Other capabilities return at once, before the scope lookup. A
 * check the kernel makes without auditing (a probe for a privilege it can
 * do without) is refused without a record.
 */
#define CAP_SYS_CHROOT 18
#define CAP_MKNOD 27
#define CAP_SYS_MODULE 16
#define CAP_SYS_RAWIO 17
#define CAP_SYS_BOOT 22
#define CAP_OPT_NOAUDIT 0x2
#define LEASH_REFUSED_CAPS ((1ULL << CAP_SYS_CHROOT) | (1ULL << CAP_MKNOD) | (1ULL << CAP_SYS_MODULE) | \
			    (1ULL << CAP_SYS_RAWIO) | (1ULL << CAP_SYS_BOOT))

SEC("lsm/capable")
int BPF_PROG(leash_capable, const struct cred *cred, struct user_namespace *ns, int cap, unsigned int opts)
{
	struct task_struct *task;
	__u32 agent;

	if (cap < 0 || cap > 63 || !(LEASH_REFUSED_CAPS & (1ULL << cap)))
		return 0;
	task = bpf_get_current_task_btf();
	if (cred != task->cred)
		return 0;       /* asked about another task's credentials */
	agent = leash_agent_of(task);
	if (!agent)
		return 0;
	if (opts & CAP_OPT_NOAUDIT)
		return -EPERM;
	return leash_refuse(agent, cap == CAP_SYS_CHROOT ? LEASH_WHY_CHROOT : LEASH_WHY_CAPABILITY, cap, NULL);
}

SEC("lsm/uring_override_creds")
int BPF_PROG(leash_uring_override_creds, const struct cred *new)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_URING, 0, NULL) : 0;
}
