/*
 * LD_PRELOAD probe for `make bench-boot`: records when a process makes its
 * first KVM_RUN ioctl, i.e. when its guest's first instruction can run.
 *
 * The same probe goes into ringvm and into QEMU, so "process start ->
 * first KVM_RUN" is measured the same way for both, without a tracer
 * stopping every syscall. It wraps glibc's ioctl(): one comparison per
 * call, and at the first KVM_RUN one clock read and one small file write
 * to the path in RINGVM_BENCH_FIRST_KVM_RUN ("<sec>.<nsec>" of
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

static void record(void)
{
	struct timespec ts;
	const char *path = getenv("RINGVM_BENCH_FIRST_KVM_RUN");
	char line[64];
	int fd, n;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	if (!path)
		return;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	n = snprintf(line, sizeof(line), "%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
	if (n > 0 && write(fd, line, (size_t)n) < 0)
		n = -1;
	close(fd);
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
