/* Tight syscall loops for bench/lsm_bench.py: prints nanoseconds per
 * iteration. Optionally confines itself with Landlock first (the in-kernel
 * reference), using rules equivalent to the bench policy. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <netinet/in.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void allow(int ruleset, const char *path, unsigned long long access)
{
	struct landlock_path_beneath_attr pb = { .allowed_access = access };
	pb.parent_fd = open(path, O_PATH | O_CLOEXEC);
	if (pb.parent_fd < 0 || syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &pb, 0)) {
		perror(path);
		exit(2);
	}
	close(pb.parent_fd);
}

/* read anything, write under WORK, execute under /usr and BIN */
static void landlock(const char *work, const char *bin)
{
	unsigned long long rd = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR;
	unsigned long long wr = LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_MAKE_REG;
	unsigned long long ex = LANDLOCK_ACCESS_FS_EXECUTE;
	struct landlock_ruleset_attr attr = { .handled_access_fs = rd | wr | ex };
	int rs = syscall(SYS_landlock_create_ruleset, &attr, sizeof(attr), 0);

	if (rs < 0) {
		perror("landlock_create_ruleset");
		exit(2);
	}
	allow(rs, "/", rd);
	allow(rs, work, rd | wr);
	allow(rs, "/usr", rd | ex);
	allow(rs, bin, rd | ex);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || syscall(SYS_landlock_restrict_self, rs, 0)) {
		perror("landlock_restrict_self");
		exit(2);
	}
	close(rs);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s open|connect|exec N TARGET [--landlock WORK BIN]\n", argv[0]);
		return 2;
	}
	const char *what = argv[1], *target = argv[3];
	long n = atol(argv[2]);
	if (argc >= 7 && !strcmp(argv[4], "--landlock"))
		landlock(argv[5], argv[6]);

	long long t0 = 0;
	if (!strcmp(what, "open")) {
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			int fd = open(target, O_RDONLY);
			if (fd < 0) { perror(target); return 1; }
			close(fd);
		}
	} else if (!strcmp(what, "connect")) {
		struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(atoi(target)) };
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
		t0 = now_ns();
		for (long i = 0; i < n; i++)
			if (connect(s, (struct sockaddr *)&sin, sizeof(sin))) { perror("connect"); return 1; }
	} else if (!strcmp(what, "exec")) {
		char *args[] = { (char *)target, NULL };
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			pid_t pid;
			int st;
			if (posix_spawn(&pid, target, NULL, NULL, args, environ)) { perror(target); return 1; }
			waitpid(pid, &st, 0);
			if (!WIFEXITED(st) || WEXITSTATUS(st)) { fprintf(stderr, "%s failed\n", target); return 1; }
		}
	} else {
		return 2;
	}
	printf("%.1f\n", (double)(now_ns() - t0) / n);
	return 0;
}
