// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * ProcessExec on the resolved binary (each level: a script, then its
 * interpreter), and the two ways around it: running a binary through the
 * dynamic loader (`ld.so /usr/bin/forbidden` maps it instead of exec'ing it)
 * and executing a file that has no path (memfd, a deleted file).
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

#define PROT_EXEC 0x4
#define VM_EXEC 0x4
#define ET_DYN 3
#define PT_INTERP 3
#define ELF_PHDR_SIZE 56
#define ELF_PHDRS_IN_BUF 3              /* (256 - 64) / 56 program headers fit in bprm->buf */

/*
 * An ELF shared object with no PT_INTERP among the program headers the
 * kernel has read is an interpreter (ld.so) or a static-pie: run directly,
 * it maps code of its own choosing, so its executable mappings are checked.
 */
static __always_inline int leash_is_loader(struct linux_binprm *bprm)
{
	const __u8 *buf = (const __u8 *)bprm->buf;
	__u8 ident[4];
	__u16 type;
	__u64 phoff;

	bpf_probe_read_kernel(ident, 4, buf);
	if (ident[0] != 0x7f || ident[1] != 'E' || ident[2] != 'L' || ident[3] != 'F')
		return 0;
	bpf_probe_read_kernel(&type, 2, buf + 16);
	if (type != ET_DYN)
		return 0;
	bpf_probe_read_kernel(&phoff, 8, buf + 32);
	if (phoff != 64)
		return 1;       /* unusual layout: treat as a loader (stricter) */
	for (int i = 0; i < ELF_PHDRS_IN_BUF; i++) {
		__u32 ptype;

		bpf_probe_read_kernel(&ptype, 4, buf + 64 + i * ELF_PHDR_SIZE);
		if (ptype == PT_INTERP)
			return 0;
	}
	return 1;
}

/* Check an executable file against ALLOW_EXEC; shared by exec and mmap. */
static __always_inline int leash_exec_check(struct file *file, __u32 agent, __u16 reason)
{
	struct leash_decision d = {};
	struct leash_config *cfg = leash_cfg();
	struct leash_scratch *s = leash_scratch_get();
	struct path_val *v;

	if (!cfg || !s)
		return -EPERM;
	d.agent = agent;
	d.generation = cfg->generation;
	d.action = LEASH_ACT_EXEC;
	v = leash_path_lookup(s, &file->f_path, &d);
	if (file->f_inode->i_nlink == 0) {
		/* memfd or deleted: no name that a policy could speak about */
		d.reason = LEASH_WHY_ANON_EXEC;
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	if (!v) {
		d.denied = 1;
		return leash_finish(&d, cfg);
	}
	d.class_id = v->class_id;
	d.denied = !(v->allow & ALLOW_EXEC);
	if (d.denied)
		d.reason = reason;
	return leash_finish(&d, cfg);
}

SEC("lsm/bprm_check_security")
int BPF_PROG(leash_bprm_check, struct linux_binprm *bprm)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct leash_task *t;
	__u32 agent = leash_agent_of(task);
	int ret;

	if (!agent)
		return 0;
	ret = leash_exec_check(bprm->file, agent, LEASH_WHY_POLICY);
	if (ret)
		return ret;
	t = bpf_task_storage_get(&leash_task, task, 0, 0);
	if (t) {
		if (leash_is_loader(bprm))
			t->flags |= LEASH_TASK_LOADER;
		else
			t->flags &= ~LEASH_TASK_LOADER;
	} else if (leash_is_loader(bprm)) {
		return -EPERM;  /* cannot remember loader mode: refuse */
	}
	return 0;
}

static __always_inline __u32 leash_loader_agent(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct leash_task *t;
	__u32 agent = leash_agent_of(task);

	if (!agent)
		return 0;
	t = bpf_task_storage_get(&leash_task, task, 0, 0);
	return t && (t->flags & LEASH_TASK_LOADER) ? agent : 0;
}

SEC("lsm/mmap_file")
int BPF_PROG(leash_mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags)
{
	__u32 agent;

	if (!file || !(prot & PROT_EXEC))
		return 0;
	agent = leash_loader_agent();
	if (!agent)
		return 0;
	return leash_exec_check(file, agent, LEASH_WHY_LOADER);
}

/* Under a directly run loader, file mappings never become executable later. */
SEC("lsm/file_mprotect")
int BPF_PROG(leash_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	     unsigned long prot)
{
	struct leash_decision d = { .action = LEASH_ACT_SELF, .reason = LEASH_WHY_MPROTECT };
	__u32 agent;

	if (!(prot & PROT_EXEC) || !vma->vm_file || (vma->vm_flags & VM_EXEC))
		return 0;
	agent = leash_loader_agent();
	return agent ? leash_deny(agent, &d) : 0;
}
