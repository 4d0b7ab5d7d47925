/*
 * Loopback connection churn, the load generator of `make bench`: a server
 * that accepts and closes first (its side goes to TIME_WAIT, so the client's
 * ephemeral ports never run out) and one client that connects, waits for the
 * server's FIN and closes, as fast as it can, for SECONDS. Prints the
 * connections made per second.
 *
 *     bench/churn PORT SECONDS
 *
 * In C: a Python client spends ~200 us per connection in the interpreter,
 * which hides a tracer's cost per connection. Run it in a throwaway network
 * namespace (bench/engines.py does) so the host's TIME_WAIT table is spared.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void serve(struct sockaddr_in *sa, int ready)
{
	int one = 1, srv = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(srv, (struct sockaddr *)sa, sizeof(*sa)) || listen(srv, 4096)) {
		perror("churn: server");
		_exit(1);
	}
	if (write(ready, "x", 1) != 1)
		_exit(1);
	for (;;) {
		int c = accept(srv, NULL, NULL);
		if (c >= 0)
			close(c);	/* active close: TIME_WAIT on the server side */
	}
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: churn PORT SECONDS\n");
		return 2;
	}
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
	double seconds = atof(argv[2]);
	int pipefd[2];
	char b;
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	if (pipe(pipefd))
		return 1;
	pid_t server = fork();
	if (server == 0)
		serve(&sa, pipefd[1]);
	if (read(pipefd[0], &b, 1) != 1)
		return 1;
	long n = 0;
	double end = now() + seconds;
	while (now() < end) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0 && read(s, &b, 1) == 0)
			n++;	/* the server's FIN: it closed first */
		close(s);
	}
	kill(server, SIGKILL);
	waitpid(server, NULL, 0);
	printf("%.1f\n", n / seconds);
	return 0;
}
