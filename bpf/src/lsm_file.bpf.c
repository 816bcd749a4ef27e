// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * File opens: FileOpenReadOnly / FileOpenReadWrite on the path the kernel
 * resolved (symlinks, relative paths and /proc/self/fd are already gone),
 * truncate(2) as FileOpenReadWrite, plus the guards that keep a governed
 * agent from renaming or linking a file out of its policy class, from
 * writing cgroup files and from opening or truncating leash's own files.
 */
#include "lsm.h"

char LICENSE[] SEC("license") = "GPL";

#define FMODE_WRITE 0x2
#define FMODE_EXEC 0x20
#define FMODE_CREATED 0x100000
#define O_TRUNC 01000
#define S_IFMT 00170000
#define S_IFDIR 0040000
#define S_IFREG 0100000
#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270

/*
 * An open a stacking filesystem (overlayfs) makes on its own behalf: the
 * real file behind a file the task has just opened (judged already; the
 * inner one carries another layer's path), or its copy-up work files. It
 * runs under the filesystem's credentials; governed tasks cannot override
 * their own (lsm_self.bpf.c refuses io_uring's). Before 6.6 the real file
 * also shows the stacked path over an inode of another superblock.
 */
static __always_inline int leash_stacked_open(struct file *file)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return task->cred != task->real_cred || file->f_inode->i_sb != file->f_path.dentry->d_sb;
}

/*
 * Files an agent may both read and write where it opened them. Renaming or
 * linking a file gives it a new path, so it is allowed only for these: an
 * agent can do with such a file nothing it could not do by copying it.
 */
struct leash_mark {
	__u32 agent;
	__u32 generation;
};

struct {
	__uint(type, BPF_MAP_TYPE_INODE_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct leash_mark);
} leash_marks SEC(".maps");

static __always_inline int leash_guard(struct leash_decision *d, const struct leash_config *cfg,
				       __u16 reason, const char *path)
{
	d->action = LEASH_ACT_SELF;
	d->reason = reason;
	d->denied = 1;
	d->always = reason == LEASH_WHY_CGROUP || reason == LEASH_WHY_PROTECTED;
	d->path = path;
	return leash_finish(d, cfg);
}

/*
 * An open that can change the file is a write whatever its access mode:
 * O_TRUNC empties a regular file right after file_open (do_open() truncates
 * once the file is open; f_flags still carries O_TRUNC here), and an open
 * that just created its file (O_CREAT) has added it to its directory.
 */
static __always_inline int leash_open_writes(struct file *file, struct inode *inode)
{
	if (file->f_mode & (FMODE_WRITE | FMODE_CREATED))
		return 1;
	return (file->f_flags & O_TRUNC) && (inode->i_mode & S_IFMT) == S_IFREG;
}

/*
 * Decide opening (write: or changing) `path` into d. Returns the reason of a
 * guard that refuses it whatever the policy says, or 0 with d->denied set
 * from the table and *allow the table's bits (0 on a miss).
 */
static __always_inline __u16 leash_file_decide(struct leash_decision *d, struct leash_scratch *s,
					       const struct path *path, struct inode *inode, int write,
					       __u32 *allow)
{
	__u64 magic = inode->i_sb->s_magic;
	struct path_val *v;
	__u32 want;

	d->is_dir = (inode->i_mode & S_IFMT) == S_IFDIR;
	d->action = write ? LEASH_ACT_WRITE : LEASH_ACT_READ;
	v = leash_path_lookup(s, path, d);
	if (write && (magic == CGROUP_SUPER_MAGIC || magic == CGROUP2_SUPER_MAGIC))
		return LEASH_WHY_CGROUP;
	if (d->path) {
		s->key.owner = 0;
		if (bpf_map_lookup_elem(&leash_protect, &s->key))
			return LEASH_WHY_PROTECTED;
	}
	*allow = 0;
	if (!v) {
		d->denied = 1;
		return 0;
	}
	d->class_id = v->class_id;
	*allow = v->allow;
	if (d->is_dir)
		want = write ? ALLOW_WRITE_DIR : ALLOW_READ_DIR;
	else
		want = write ? ALLOW_WRITE_FILE : ALLOW_READ_FILE;
	d->denied = !(v->allow & want);
	return 0;
}

SEC("lsm/file_open")
int BPF_PROG(leash_file_open, struct file *file)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	struct leash_scratch *s;
	struct inode *inode;
	__u32 agent, allow;
	__u16 guard;

	agent = leash_agent();
	if (!agent)
		return 0;
	/* The binary of an exec is judged by bprm_check_security. */
	if (file->f_mode & FMODE_EXEC)
		return 0;
	if (leash_stacked_open(file))
		return 0;
	cfg = leash_cfg();
	s = leash_scratch_get();
	if (!cfg || !s)
		return -EPERM;
	inode = file->f_inode;
	d.agent = agent;
	d.generation = cfg->generation;
	guard = leash_file_decide(&d, s, &file->f_path, inode, leash_open_writes(file, inode), &allow);
	if (guard)
		return leash_guard(&d, cfg, guard, d.path);
	if (!d.denied && !d.is_dir &&
	    (allow & (ALLOW_READ_FILE | ALLOW_WRITE_FILE)) == (ALLOW_READ_FILE | ALLOW_WRITE_FILE)) {
		struct leash_mark *m = bpf_inode_storage_get(&leash_marks, inode, 0,
							     BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (m) {
			m->agent = agent;
			m->generation = d.generation;
		}
	}
	return leash_finish(&d, cfg);
}

/*
 * truncate(2) changes a file without opening it. (An O_TRUNC open was judged
 * a write by file_open, ftruncate(2) needs a descriptor opened for writing;
 * both end here too and are judged again as the same write.) An fmod_ret
 * program on security_path_truncate because that function is on bpf_d_path's
 * allow list on every kernel, where lsm/path_truncate is only from 6.8; a
 * non-zero return refuses the truncate.
 */
SEC("fmod_ret/security_path_truncate")
int BPF_PROG(leash_path_truncate, const struct path *path, int ret)
{
	struct leash_decision d = {};
	struct leash_config *cfg;
	struct leash_scratch *s;
	__u32 agent, allow;
	__u16 guard;

	if (ret)
		return ret;
	agent = leash_agent();
	if (!agent)
		return 0;
	cfg = leash_cfg();
	s = leash_scratch_get();
	if (!cfg || !s)
		return -EPERM;
	d.agent = agent;
	d.generation = cfg->generation;
	guard = leash_file_decide(&d, s, path, path->dentry->d_inode, 1, &allow);
	if (guard)
		return leash_guard(&d, cfg, guard, d.path);
	return leash_finish(&d, cfg);
}

static __always_inline int leash_marked(struct inode *inode, __u32 agent, __u32 generation)
{
	struct leash_mark *m;

	if (!inode)
		return 1;
	m = bpf_inode_storage_get(&leash_marks, inode, 0, 0);
	return m && m->agent == agent && m->generation == generation;
}

static __always_inline int leash_rename_guard(struct dentry *old, struct dentry *new, __u16 reason)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct leash_decision d = {};
	struct leash_config *cfg;
	struct leash_scratch *s;
	__u32 agent;

	/* A stacking filesystem (overlayfs copy-up, its rename or link on the
	 * upper layer) acting under its own credentials: the operation the task
	 * asked for was judged on the stacked inodes. Governed tasks cannot
	 * override their credentials themselves (lsm_self.bpf.c, io_uring). */
	if (task->cred != task->real_cred)
		return 0;
	agent = leash_agent_of(task);
	if (!agent)
		return 0;
	cfg = leash_cfg();
	s = leash_scratch_get();
	if (!cfg || !s)
		return -EPERM;
	if (leash_marked(old->d_inode, agent, cfg->generation) &&
	    leash_marked(new ? new->d_inode : NULL, agent, cfg->generation))
		return 0;
	d.agent = agent;
	d.generation = cfg->generation;
	/* No struct path here, so the event names the file, not its full path. */
	bpf_probe_read_kernel_str(s->buf, LEASH_EVENT_PATH, old->d_name.name);
	return leash_guard(&d, cfg, reason, s->buf);
}

SEC("lsm/inode_link")
int BPF_PROG(leash_inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry)
{
	return leash_rename_guard(old_dentry, NULL, LEASH_WHY_LINK);
}

SEC("lsm/inode_rename")
int BPF_PROG(leash_inode_rename, struct inode *old_dir, struct dentry *old_dentry,
	     struct inode *new_dir, struct dentry *new_dentry)
{
	return leash_rename_guard(old_dentry, new_dentry, LEASH_WHY_RENAME);
}
