// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Mounts, whatever the policy says and in audit mode too. Policies name
 * files by path, and bpf_d_path shows the path the file has through the
 * mounts of the task's namespace: an agent that can mount (root, or anyone
 * in a user namespace of its own: unshare -Urm) could bind-mount a
 * forbidden directory under an allowed path, or read it through an
 * overlay, and open it by a name the policy allows. So a governed agent
 * may not make, move or pivot a mount, nor change its root or enter
 * another mount namespace (those two through CAP_SYS_CHROOT, refused in
 * lsm_self.bpf.c with the other capabilities no agent may use). A mount it can make without any of these hooks
 * (open_tree(OPEN_TREE_CLONE): a detached copy, used through its fd) is
 * outside its namespace, and every open through it is refused
 * (leash_foreign_mount in leash.h).
 */
#include "leash.h"

char LICENSE[] SEC("license") = "GPL";

/* mount(2), every kind: new, bind, move, remount, propagation. */
SEC("lsm/sb_mount")
int BPF_PROG(leash_sb_mount, const char *dev_name, const struct path *path, const char *type,
	     unsigned long flags, void *data)
{
	__u32 agent = leash_agent();
	struct leash_scratch *s;

	if (!agent)
		return 0;
	/* The record names the mount point, when it has a name. */
	s = leash_scratch_get();
	if (s && bpf_d_path((struct path *)path, s->buf, sizeof(s->buf)) > 0)
		return leash_refuse(agent, LEASH_WHY_MOUNT, 0, s->buf);
	return leash_refuse(agent, LEASH_WHY_MOUNT, 0, NULL);
}

/* fsconfig(FSCONFIG_CMD_CREATE): the new API's superblock, before fsmount(). */
SEC("lsm/sb_kern_mount")
int BPF_PROG(leash_sb_kern_mount, const struct super_block *sb)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_MOUNT, 0, sb->s_type->name) : 0;
}

/* move_mount(2): attaching a detached mount (open_tree, fsmount) or moving one. */
SEC("lsm/move_mount")
int BPF_PROG(leash_move_mount, const struct path *from_path, const struct path *to_path)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_MOUNT, 0, (const char *)to_path->dentry->d_name.name) : 0;
}

SEC("lsm/sb_pivotroot")
int BPF_PROG(leash_sb_pivotroot, const struct path *old_path, const struct path *new_path)
{
	__u32 agent = leash_agent();

	return agent ? leash_refuse(agent, LEASH_WHY_MOUNT, 0, (const char *)new_path->dentry->d_name.name) : 0;
}
