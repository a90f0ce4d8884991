/*
 * ringvm's guest init for `ringvm -- COMMAND`: PID 1 of a guest whose first
 * root is ringvm's control tree (virtio-9p, mount tag "ringvm"):
 *
 *   /init    this program          /stdin /stdout /stderr  ringvm's stdio
 *   /config  what to do (below)    /mnt                    an empty directory
 *
 * It mounts a tmpfs on /mnt, the root share read-only under it, an overlay
 * of a tmpfs on top (writes land in guest memory, never on the host),
 * /proc, /sys, /dev, /tmp, and every --share; opens ringvm's stdio; enters
 * the overlay (chroot) and the working directory; runs the command with
 * stdin, stdout and stderr on ringvm's; waits for it; syncs; and reports
 * its status on the exit port (0x504), after which ringvm exits with it.
 *
 * /config is a list of NUL-terminated words, so arguments carry any byte
 * but NUL, exactly:
 *
 *   "ringvm-init 1"
 *   "root"  TAG OPTIONS                       the root share
 *   "share" TAG GUEST_DIR ro|rw OPTIONS       repeated
 *   "cwd"   DIR
 *   "env"   NAME=VALUE                        repeated
 *   "arg"   WORD                              repeated, argv in order
 *   "verbose" "0"|"1"
 *   "end"
 *
 * Status word written to port 0x504 (32 bits):
 *   bits 0-7 code, bits 8-15 kind, bits 16-31 errno (setup failures)
 *   kind 0: the command exited with `code`
 *   kind 1: the command was killed by signal `code`
 *   kind 2: setup failed at stage `code` (see enum stage), before the
 *           command ran; the errno says why
 *
 * Guest user space may run in an instruction emulator (~1.6 us per
 * instruction): this program makes only the system calls it needs and
 * never forks a shell.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define STATUS_PORT 0x504
#define CONFIG_MAX (1 << 20)
#define MAX_SHARES 32
#define MAX_ARGS 4096
#define MAX_ENV 1024

enum kind { KIND_EXITED = 0, KIND_SIGNALED = 1, KIND_SETUP = 2 };

enum stage {
	STAGE_CONFIG = 1,
	STAGE_TMPFS = 2,
	STAGE_ROOT = 3,
	STAGE_OVERLAY = 4,
	STAGE_SYSTEM = 5,
	STAGE_SHARE = 6,
	STAGE_STDIO = 7,
	STAGE_CHROOT = 8,
	STAGE_CWD = 9,
	STAGE_FORK = 10,
};

struct share {
	const char *tag, *dir, *mode, *opts;
};

static int verbose;

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	/* The console, as the kernel opened it for PID 1. */
	if (write(2, buf, n) < 0)
		return;
}

static void report(unsigned kind, unsigned code, unsigned err)
{
	unsigned value = (code & 0xff) | (kind & 0xff) << 8 | (err & 0xffff) << 16;

	if (ioperm(STATUS_PORT, 4, 1) == 0)
		outl(value, STATUS_PORT);
	else
		say("ringvm-init: cannot reach the exit port: %s", strerror(errno));
}

/* Ends the guest: ringvm exits at the status write; power-off is the
 * fallback for a VMM that does not know the port. PID 1 never returns. */
static void __attribute__((noreturn)) finish(unsigned kind, unsigned code, unsigned err)
{
	sync();
	report(kind, code, err);
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void __attribute__((noreturn)) fail(enum stage stage, const char *what)
{
	int err = errno;

	say("ringvm-init: %s: %s", what, strerror(err));
	finish(KIND_SETUP, stage, err);
}

static char *read_config(size_t *len)
{
	int fd = open("/config", O_RDONLY | O_CLOEXEC);
	char *buf;
	size_t got = 0;

	if (fd < 0)
		fail(STAGE_CONFIG, "open /config");
	buf = malloc(CONFIG_MAX + 1);
	if (!buf)
		fail(STAGE_CONFIG, "malloc");
	for (;;) {
		ssize_t n = read(fd, buf + got, CONFIG_MAX - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail(STAGE_CONFIG, "read /config");
		if (n == 0 || got + n >= CONFIG_MAX) {
			got += n;
			break;
		}
		got += n;
	}
	close(fd);
	buf[got] = 0;
	*len = got;
	return buf;
}

/* Splits the config into its words. */
struct words {
	char *p, *end;
};

static const char *next(struct words *w)
{
	char *s = w->p;
	char *nul;

	if (s >= w->end)
		return NULL;
	nul = memchr(s, 0, w->end - s);
	if (!nul)
		return NULL;
	w->p = nul + 1;
	return s;
}

static void __attribute__((noreturn)) bad_config(const char *why)
{
	errno = EINVAL;
	fail(STAGE_CONFIG, why);
}

static const char *need(struct words *w)
{
	const char *s = next(w);

	if (!s)
		bad_config("config ends in the middle of a record");
	return s;
}

/* mkdir -p, for mount points inside the overlay. */
static int mkdir_p(const char *path)
{
	char buf[4096];
	size_t len = strlen(path);

	if (len >= sizeof(buf)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, len + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(buf, 0755) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(buf, 0755) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

static void mount_or_fail(const char *src, const char *dst, const char *type,
			  unsigned long flags, const char *data, enum stage stage)
{
	char what[300];

	if (mount(src, dst, type, flags, data) == 0) {
		if (verbose)
			say("ringvm-init: mounted %s (%s) on %s", src, type, dst);
		return;
	}
	snprintf(what, sizeof(what), "mount %s (%s) on %s", src, type, dst);
	fail(stage, what);
}

static void mount_system(const char *src, const char *dir, const char *type,
			 unsigned long flags, const char *data)
{
	char path[64];

	snprintf(path, sizeof(path), "/mnt/root%s", dir);
	if (mkdir_p(path) < 0)
		fail(STAGE_SYSTEM, path);
	mount_or_fail(src, path, type, flags, data, STAGE_SYSTEM);
}

/*
 * The guest gets a fresh /tmp. A working directory under the host's /tmp
 * (a checkout there, with the host's root) would vanish under it, so that
 * one directory is opened in the root overlay before /tmp is mounted
 * (`hold_cwd`) and bound back at its own path afterwards (`restore_cwd`),
 * with the overlay's semantics: writes stay in guest memory.
 */
static int hold_cwd(const char *cwd, char *path, size_t size)
{
	if (strncmp(cwd, "/tmp/", 5))
		return -1;
	if (snprintf(path, size, "/mnt/root%s", cwd) >= (int)size)
		return -1;
	/* Missing on the host too: chdir reports it later, as for any cwd. */
	return open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
}

static void restore_cwd(int fd, const char *path, const char *cwd)
{
	char src[64];

	if (fd < 0)
		return;
	snprintf(src, sizeof(src), "/mnt/root/proc/self/fd/%d", fd);
	if (mkdir_p(path) < 0 || mount(src, path, NULL, MS_BIND, NULL) < 0)
		fail(STAGE_CWD, cwd);
	close(fd);
}

static int open_stdio(const char *path, int flags)
{
	int fd = open(path, flags | O_CLOEXEC);

	if (fd < 0)
		fail(STAGE_STDIO, path);
	return fd;
}

int main(void)
{
	static char *argv[MAX_ARGS + 1], *envp[MAX_ENV + 1];
	static struct share shares[MAX_SHARES];
	const char *root_tag = NULL, *root_opts = NULL, *cwd = "/";
	char cwd_path[4096];
	int cwd_fd;
	int nargs = 0, nenv = 0, nshares = 0;
	struct words w;
	size_t len;
	char *cfg = read_config(&len);
	int in, out, err, status;
	pid_t child;

	w.p = cfg;
	w.end = cfg + len;
	{
		const char *magic = next(&w);

		if (!magic || strcmp(magic, "ringvm-init 1") != 0)
			bad_config("not a ringvm-init 1 config");
	}
	for (;;) {
		const char *key = next(&w);

		if (!key)
			bad_config("config has no end record");
		if (!strcmp(key, "end"))
			break;
		if (!strcmp(key, "root")) {
			root_tag = need(&w);
			root_opts = need(&w);
		} else if (!strcmp(key, "share")) {
			if (nshares == MAX_SHARES)
				bad_config("too many shares");
			shares[nshares].tag = need(&w);
			shares[nshares].dir = need(&w);
			shares[nshares].mode = need(&w);
			shares[nshares].opts = need(&w);
			nshares++;
		} else if (!strcmp(key, "cwd")) {
			cwd = need(&w);
		} else if (!strcmp(key, "env")) {
			if (nenv == MAX_ENV)
				bad_config("too many environment variables");
			envp[nenv++] = (char *)need(&w);
		} else if (!strcmp(key, "arg")) {
			if (nargs == MAX_ARGS)
				bad_config("too many arguments");
			argv[nargs++] = (char *)need(&w);
		} else if (!strcmp(key, "verbose")) {
			verbose = need(&w)[0] == '1';
		} else {
			bad_config("unknown config record");
		}
	}
	if (!root_tag || nargs == 0)
		bad_config("config lacks the root share or the command");
	argv[nargs] = NULL;
	envp[nenv] = NULL;

	mount_or_fail("tmpfs", "/mnt", "tmpfs", 0, "mode=0755", STAGE_TMPFS);
	if (mkdir("/mnt/lower", 0755) || mkdir("/mnt/upper", 0755) ||
	    mkdir("/mnt/work", 0755) || mkdir("/mnt/root", 0755))
		fail(STAGE_TMPFS, "mkdir under /mnt");
	mount_or_fail(root_tag, "/mnt/lower", "9p", MS_RDONLY, root_opts, STAGE_ROOT);
	mount_or_fail("overlay", "/mnt/root", "overlay", 0,
		      "lowerdir=/mnt/lower,upperdir=/mnt/upper,workdir=/mnt/work",
		      STAGE_OVERLAY);
	mount_system("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_system("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_system("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	cwd_fd = hold_cwd(cwd, cwd_path, sizeof(cwd_path));
	mount_system("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	restore_cwd(cwd_fd, cwd_path, cwd);
	for (int i = 0; i < nshares; i++) {
		char path[4096];
		unsigned long flags = strcmp(shares[i].mode, "rw") ? MS_RDONLY : 0;

		if (snprintf(path, sizeof(path), "/mnt/root%s", shares[i].dir) >= (int)sizeof(path)) {
			errno = ENAMETOOLONG;
			fail(STAGE_SHARE, shares[i].dir);
		}
		if (mkdir_p(path) < 0)
			fail(STAGE_SHARE, path);
		mount_or_fail(shares[i].tag, path, "9p", flags, shares[i].opts, STAGE_SHARE);
	}

	in = open_stdio("/stdin", O_RDONLY);
	out = open_stdio("/stdout", O_WRONLY);
	err = open_stdio("/stderr", O_WRONLY);
	if (chroot("/mnt/root") < 0 || chdir("/") < 0)
		fail(STAGE_CHROOT, "chroot /mnt/root");
	if (chdir(cwd) < 0)
		fail(STAGE_CWD, cwd);

	child = fork();
	if (child < 0)
		fail(STAGE_FORK, "fork");
	if (child == 0) {
		sigset_t none;
		int e;

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
			_exit(126);
		execvpe(argv[0], argv, envp);
		e = errno;
		dprintf(2, "ringvm: cannot run %s: %s\n", argv[0], strerror(e));
		_exit(e == ENOENT ? 127 : 126);
	}
	close(in);
	close(out);
	close(err);
	if (verbose)
		say("ringvm-init: running %s (pid %d)", argv[0], (int)child);

	/* PID 1 inherits every orphan: reap them all until the command ends. */
	for (;;) {
		pid_t pid = waitpid(-1, &status, 0);

		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0)
			fail(STAGE_FORK, "waitpid");
		if (pid == child)
			break;
	}
	if (WIFSIGNALED(status))
		finish(KIND_SIGNALED, WTERMSIG(status), 0);
	finish(KIND_EXITED, WEXITSTATUS(status), 0);
}
