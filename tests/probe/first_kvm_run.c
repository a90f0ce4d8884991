/*
 * LD_PRELOAD probe for `make bench-boot`: records when a process makes its
 * first KVM_RUN ioctl, i.e. when its guest's first instruction can run.
 *
 * The same probe goes into ringvm and into QEMU, so "process start ->
 * first KVM_RUN" is measured the same way for both, without a tracer
 * stopping every syscall. It wraps glibc's ioctl(): one comparison per
 * call, and at the first KVM_RUN one clock read and one small write to
 * the file (opened at load time) named by RINGVM_BENCH_FIRST_KVM_RUN ("<sec>.<nsec>" of
 * CLOCK_MONOTONIC, the clock the benchmark reads before it starts the
 * process). Built by bench_boot with `cc -shared -fPIC`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*ioctl_fn)(int, unsigned long, ...);

static int seen;
static int stamp_fd = -1;

/*
 * The stamp file is opened when the library loads, on the main thread
 * before the VMM sandboxes itself: a vCPU thread under ringvm's seccomp
 * filter may not open files, but it may write to an open one.
 */
__attribute__((constructor)) static void open_stamp(void)
{
	const char *path = getenv("RINGVM_BENCH_FIRST_KVM_RUN");

	if (path)
		stamp_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

static void record(void)
{
	struct timespec ts;
	char line[64];
	int n;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	if (stamp_fd < 0)
		return;
	n = snprintf(line, sizeof(line), "%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
	if (n > 0 && write(stamp_fd, line, (size_t)n) < 0)
		n = -1;
}

int ioctl(int fd, unsigned long request, ...)
{
	static ioctl_fn real;
	va_list ap;
	void *arg;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (!real)
		real = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
	if (request == KVM_RUN && !__atomic_exchange_n(&seen, 1, __ATOMIC_SEQ_CST))
		record();
	return real(fd, request, arg);
}
