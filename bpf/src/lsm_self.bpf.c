// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Self-protection, whatever the policy says and in audit mode too: a
 * governed agent cannot use
 * bpf(), nor trace or signal the leash daemon, nor run io_uring requests
 * under other credentials (leash tells a filesystem's own credential
 * overrides from the task's by that). Cgroup writes and leash's own files
 * are guarded in lsm_file.bpf.c, mounts in lsm_mount.bpf.c.
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline int leash_is_daemon(struct task_struct *p)
{
	struct leash_config *cfg = leash_cfg();
	return cfg && cfg->daemon_tgid && p->tgid == cfg->daemon_tgid;
}

SEC("lsm/bpf")
int BPF_PROG(leash_bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_BPF, cmd, NULL) : 0;
}

SEC("lsm/ptrace_access_check")
int BPF_PROG(leash_ptrace, struct task_struct *child, unsigned int mode)
{
	__u32 agent = leash_agent();

	if (!agent || !leash_is_daemon(child))
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
	if (!agent || !leash_is_daemon(p))
		return 0;
	return leash_refuse(agent, LEASH_WHY_SIGNAL, p->tgid, NULL);
}

SEC("lsm/uring_override_creds")
int BPF_PROG(leash_uring_override_creds, const struct cred *new)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_URING, 0, NULL) : 0;
}
