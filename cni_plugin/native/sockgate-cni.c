/*
 * sockgate's compiled CNI executable: forwards a CNI request to the node agent.
 *
 * It does what cni_plugin/shim.py's forwarding path does, without an interpreter:
 * read CNI_* and stdin, send them to <runDir>/agent.sock in the wire format of
 * runtime/wire.py, print the agent's stdout, exit with its code. VERSION is
 * answered here. When no agent listens, the request goes to the Python
 * installation if install-cni put its launcher beside this file
 * (`sockgate-python`, today's in-process path); without one, CNI error 11 (try
 * again later), so the runtime retries.
 *
 * Built static against musl (scripts/setup): no libc version, no loader, runs on
 * any Linux node. Only what a forwarder needs: no JSON parser (runDir and
 * cniVersion are simple top-level strings in every config a runtime writes; one
 * with escapes falls back to the defaults, as the Python shim's fast path does).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "SG1\n"
#define DEFAULT_RUN_DIR "/run/sockgate"
#define AGENT_SOCKET "agent.sock"
#define PYTHON_LAUNCHER "sockgate-python"
#define CNI_VERSION "1.1.0"
#define SUPPORTED "[\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]"
#define INVALID_ENV 4
#define TRY_AGAIN_LATER 11
#define INTERNAL 999
/* Long enough for an ADD under load; a hung agent must not hang the runtime. */
#define AGENT_TIMEOUT_S 120
#define MAX_INPUT (4 << 20)

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static void grow(struct buf *b, size_t need)
{
    if (b->len + need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        abort();
    b->data = p;
    b->cap = cap;
}

static void append(struct buf *b, const void *data, size_t n)
{
    grow(b, n);
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static int read_all(int fd, struct buf *b, size_t limit)
{
    for (;;) {
        grow(b, 65536);
        ssize_t n = read(fd, b->data + b->len, b->cap - b->len);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        b->len += (size_t)n;
        if (b->len > limit)
            return -1;
    }
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The value of a top-level string field found once, without escapes (the same
 * rule as runtime/wire.py's top_level_string); NULL otherwise. */
static char *simple_string(const struct buf *config, const char *key)
{
    char needle[64];
    int nl = snprintf(needle, sizeof needle, "\"%s\"", key);
    const char *end = config->data + config->len;
    const char *at = memmem(config->data, config->len, needle, (size_t)nl);
    if (!at || memmem(at + 1, (size_t)(end - at - 1), needle, (size_t)nl))
        return NULL;
    const char *p = at + nl;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    if (p >= end || *p++ != ':')
        return NULL;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    if (p >= end || *p++ != '"')
        return NULL;
    const char *q = memchr(p, '"', (size_t)(end - p));
    if (!q || memchr(p, '\\', (size_t)(q - p)))
        return NULL;
    return strndup(p, (size_t)(q - p));
}

static int supported(const char *v)
{
    static const char *const all[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
    for (size_t i = 0; v && i < sizeof all / sizeof *all; i++)
        if (!strcmp(v, all[i]))
            return 1;
    return 0;
}

/* Text as a JSON string body: the messages below carry paths and errno texts. */
static void json_escaped(struct buf *out, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            append(out, e, 2);
        } else if (c < 0x20) {
            char e[8];
            int n = snprintf(e, sizeof e, "\\u%04x", c);
            append(out, e, (size_t)n);
        } else {
            append(out, &c, 1);
        }
    }
}

static int cni_error(const struct buf *config, int code, const char *msg, const char *details)
{
    char *asked = simple_string(config, "cniVersion");
    struct buf out = {0};
    const char *head = "{\"cniVersion\": \"";
    append(&out, head, strlen(head));
    json_escaped(&out, supported(asked) ? asked : CNI_VERSION);
    char num[32];
    int n = snprintf(num, sizeof num, "\", \"code\": %d, \"msg\": \"", code);
    append(&out, num, (size_t)n);
    json_escaped(&out, msg);
    append(&out, "\", \"details\": \"", 15);
    json_escaped(&out, details);
    append(&out, "\"}\n", 3);
    write_all(1, out.data, out.len);
    return 1;
}

static int version_reply(const struct buf *config)
{
    char *asked = simple_string(config, "cniVersion");
    printf("{\"cniVersion\": \"%s\", \"supportedVersions\": %s}\n", supported(asked) ? asked : CNI_VERSION,
           SUPPORTED);
    return 0;
}

/* connect() to the agent; -1 when none listens (nothing was sent). A full accept
 * backlog (EAGAIN on a unix socket) means busy, not gone: wait for it. */
static int connect_agent(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return -1;
    strcpy(sa.sun_path, path);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            struct timeval tv = {.tv_sec = AGENT_TIMEOUT_S};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            return fd;
        }
        int err = errno;
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (err != EAGAIN || now.tv_sec - start.tv_sec > AGENT_TIMEOUT_S)
            return -1;
        struct timespec pause = {.tv_nsec = 5 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

static void request(struct buf *req, const struct buf *config)
{
    append(req, MAGIC, strlen(MAGIC));
    int first = 1;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) || !strchr(*e, '='))
            continue;
        if (!first)
            append(req, "\0", 1);
        append(req, *e, strlen(*e));
        first = 0;
    }
    append(req, "\0\0", 2);
    append(req, config->data, config->len);
}

/* Once the request is sent, a broken reply is an error, never a silent retry:
 * the agent may have done half an ADD, and the runtime must retry (code 11). */
static int exchange(int fd, const struct buf *config)
{
    struct buf req = {0}, reply = {0};
    request(&req, config);
    if (write_all(fd, req.data, req.len) < 0 || shutdown(fd, SHUT_WR) < 0 || read_all(fd, &reply, MAX_INPUT) < 0)
        return cni_error(config, TRY_AGAIN_LATER, "the sockgate agent did not answer", strerror(errno));
    char *nl = memchr(reply.data, '\n', reply.len);
    char *endp;
    long code = nl ? strtol(reply.data, &endp, 10) : 0;
    if (!nl || endp != nl)
        return cni_error(config, TRY_AGAIN_LATER, "the sockgate agent did not answer",
                         "ValueError: truncated reply from the agent");
    size_t out = reply.len - (size_t)(nl + 1 - reply.data);
    if (out) {
        write_all(1, nl + 1, out);
        write_all(1, "\n", 1);
    }
    return (int)code;
}

/* The Python installation's launcher beside this executable, if install-cni put
 * one there: it runs the request in-process, as the Python shim would. */
static void hand_to_python(const struct buf *config, char **argv)
{
    char self[PATH_MAX], launcher[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return;
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (!slash)
        return;
    *slash = 0;
    if (snprintf(launcher, sizeof launcher, "%s/%s", self, PYTHON_LAUNCHER) >= (int)sizeof launcher ||
        access(launcher, X_OK) != 0)
        return;
    /* stdin was read: give the launcher the same bytes on a fresh fd 0. */
    int mem = memfd_create("sockgate-stdin", 0);
    if (mem < 0 || write_all(mem, config->data, config->len) < 0 || lseek(mem, 0, SEEK_SET) < 0 ||
        dup2(mem, 0) < 0)
        return;
    close(mem);
    argv[0] = launcher;
    execve(launcher, argv, environ);
}

int main(int argc, char **argv)
{
    (void)argc;
    /* An agent or a runtime that hung up must be an error we report (or an exit
     * code), not a silent death by SIGPIPE; Python ignores it the same way. */
    signal(SIGPIPE, SIG_IGN);
    struct buf config = {0};
    if (read_all(0, &config, MAX_INPUT) < 0)
        return cni_error(&config, INTERNAL, "cannot read the network configuration on stdin", strerror(errno));
    grow(&config, 1);
    config.data[config.len] = 0;
    /* The checks runtime/cni/request.py makes first, with its words: they need no
     * agent, so a node without one still gets the same error. */
    static const char *const commands[] = {"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"};
    const char *command = getenv("CNI_COMMAND");
    if (!command || !*command)
        return cni_error(&config, INVALID_ENV, "CNI_COMMAND is not set", "");
    size_t i = 0;
    while (i < sizeof commands / sizeof *commands && strcmp(command, commands[i]))
        i++;
    if (i == sizeof commands / sizeof *commands) {
        char msg[256];
        snprintf(msg, sizeof msg, "CNI_COMMAND '%.200s' is not a CNI command", command);
        return cni_error(&config, INVALID_ENV, msg, "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION");
    }
    if (!strcmp(command, "VERSION"))
        return version_reply(&config);

    char *run_dir = simple_string(&config, "runDir");
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", run_dir && *run_dir ? run_dir : DEFAULT_RUN_DIR, AGENT_SOCKET);
    int fd = connect_agent(path);
    if (fd >= 0)
        return exchange(fd, &config);

    hand_to_python(&config, argv);
    char details[PATH_MAX + 512];
    snprintf(details, sizeof details,
             "no agent listens on %s and this node has no sockgate Python installation to run the request "
             "(%s beside this executable); start the agent (sockgate agent), the runtime retries",
             path, PYTHON_LAUNCHER);
    return cni_error(&config, TRY_AGAIN_LATER, "the sockgate agent is not running", details);
}
