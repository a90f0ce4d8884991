/*
 * vsock-probe: the guest side of ringvm's vsock integration test, run
 * inside a Linux guest (static, no libc beyond the syscalls).
 *
 *   vsock-probe HOST_PORT LISTEN_PORT BULK_BYTES
 *
 * 1. Listens on vsock port LISTEN_PORT (for the host's CONNECT later).
 * 2. Connects to the host (CID 2) on an unserved port 9: must be refused.
 * 3. Connects to the host on HOST_PORT (ringvm: <uds_path>_HOST_PORT),
 *    sends "hello from guest\n" and BULK_BYTES of a pattern, shuts its
 *    write side, reads "hello from host\n" and BULK_BYTES of the pattern
 *    back until end of file, checks them.
 * 4. Accepts one connection on LISTEN_PORT (the host's "CONNECT port")
 *    and echoes it until end of file.
 * Exit status 0 when all held; otherwise a distinct code and a line on
 * stderr. Bulk sizes above the 256 KiB each side offers as credit make
 * both directions depend on credit updates.
 */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned char pattern(size_t i) { return (unsigned char)(i * 7 + 3); }

static int fail(int code, const char *what) {
	fprintf(stderr, "vsock-probe: %s: %s\n", what, strerror(errno));
	return code;
}

static int connect_host(unsigned port) {
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(s);
		errno = e;
		return -1;
	}
	return s;
}

static int write_all(int s, const unsigned char *p, size_t n) {
	while (n > 0) {
		ssize_t w = write(s, p, n);
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int main(int argc, char **argv) {
	static unsigned char buf[65536];
	const char hello[] = "hello from guest\n", reply[] = "hello from host\n";
	if (argc != 4) {
		fprintf(stderr, "usage: vsock-probe HOST_PORT LISTEN_PORT BULK_BYTES\n");
		return 2;
	}
	unsigned host_port = (unsigned)atoi(argv[1]), listen_port = (unsigned)atoi(argv[2]);
	size_t bulk = (size_t)atol(argv[3]);

	int l = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm la = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = listen_port};
	if (l < 0 || bind(l, (struct sockaddr *)&la, sizeof(la)) < 0 || listen(l, 1) < 0)
		return fail(10, "listen");

	if (connect_host(9) >= 0) {
		fprintf(stderr, "vsock-probe: port 9 has no socket, yet the connection was accepted\n");
		return 11;
	}
	printf("vsock-probe: port 9 refused (%s)\n", strerror(errno));

	int c = connect_host(host_port);
	if (c < 0)
		return fail(12, "connect to the host");
	if (write_all(c, (const unsigned char *)hello, strlen(hello)) < 0)
		return fail(13, "send hello");
	for (size_t off = 0; off < bulk;) {
		size_t n = bulk - off < sizeof(buf) ? bulk - off : sizeof(buf);
		for (size_t i = 0; i < n; i++)
			buf[i] = pattern(off + i);
		if (write_all(c, buf, n) < 0)
			return fail(14, "send bulk");
		off += n;
	}
	if (shutdown(c, SHUT_WR) < 0)
		return fail(15, "shutdown");
	size_t got = 0, want = strlen(reply) + bulk;
	for (;;) {
		ssize_t r = read(c, buf, sizeof(buf));
		if (r < 0)
			return fail(16, "read the host's answer");
		if (r == 0)
			break;
		for (ssize_t i = 0; i < r; i++, got++) {
			unsigned char expect = got < strlen(reply) ? (unsigned char)reply[got]
			                                           : pattern(got - strlen(reply));
			if (got >= want || buf[i] != expect) {
				fprintf(stderr, "vsock-probe: byte %zu of the host's answer is wrong\n", got);
				return 17;
			}
		}
	}
	if (got != want) {
		fprintf(stderr, "vsock-probe: the host sent %zu bytes, expected %zu\n", got, want);
		return 18;
	}
	close(c);
	printf("vsock-probe: guest-initiated ok (%zu bytes each way)\n", bulk);
	fflush(stdout);

	int s = accept(l, NULL, NULL);
	if (s < 0)
		return fail(19, "accept the host's connection");
	size_t echoed = 0;
	for (;;) {
		ssize_t r = read(s, buf, sizeof(buf));
		if (r < 0)
			return fail(20, "read from the host");
		if (r == 0)
			break;
		if (write_all(s, buf, (size_t)r) < 0)
			return fail(21, "echo to the host");
		echoed += (size_t)r;
	}
	close(s);
	printf("vsock-probe: host-initiated ok (%zu bytes echoed)\n", echoed);
	return 0;
}
