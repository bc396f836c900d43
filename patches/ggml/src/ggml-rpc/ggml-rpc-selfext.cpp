// selfext's additions to ggml-rpc that need none of its internals: timeouts, connect with a timeout, and the
// record of failures that replaces upstream's aborts (see ggml-rpc-selfext.h in patches/ggml/include).

#include "ggml-rpc-selfext-impl.h"
#include "ggml-impl.h"

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#ifndef _WIN32
#  include <fcntl.h>
#  include <poll.h>
#  include <sys/time.h>
#endif

static double env_seconds(const char * name, double fallback) {
    const char * value = std::getenv(name);
    if (!value || !*value) {
        return fallback;
    }
    char * end = nullptr;
    const double s = std::strtod(value, &end);
    if (end == value || *end != '\0' || !(s > 0) || !std::isfinite(s)) {
        GGML_LOG_WARN("%s=%s is not a number of seconds > 0: using %g\n", name, value, fallback);
        return fallback;
    }
    return s;
}

double selfext_rpc_connect_timeout() {
    static const double s = env_seconds("SELFEXT_RPC_CONNECT_TIMEOUT", 10.0);
    return s;
}

double selfext_rpc_call_timeout() {
    static const double s = env_seconds("SELFEXT_RPC_TIMEOUT", 600.0);
    return s;
}

bool selfext_rpc_set_timeouts(selfext_sockfd_t fd, double seconds) {
#ifdef _WIN32
    DWORD ms = (DWORD) (seconds * 1000.0);
    const char * v = (const char *) &ms;
    const int n = sizeof(ms);
#else
    struct timeval tv;
    tv.tv_sec  = (time_t) seconds;
    tv.tv_usec = (suseconds_t) ((seconds - (double) tv.tv_sec) * 1e6);
    const void * v = &tv;
    const socklen_t n = sizeof(tv);
#endif
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, v, n) == 0 && setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, v, n) == 0;
}

int selfext_rpc_connect(selfext_sockfd_t fd, const struct sockaddr * addr, selfext_socklen_t len) {
    const double timeout = selfext_rpc_connect_timeout();
#ifdef _WIN32
    // Winsock: a blocking connect (its own timeout of about 20 s), then the hello's timeouts
    if (connect(fd, addr, len) != 0) {
        return -1;
    }
#else
    const int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        return -1;
    }
    int rc = connect(fd, addr, len);
    if (rc < 0 && errno == EINPROGRESS) {
        struct pollfd p = { fd, POLLOUT, 0 };
        do {
            rc = poll(&p, 1, (int) (timeout * 1000.0));
        } while (rc < 0 && errno == EINTR);
        if (rc == 0) {
            errno = ETIMEDOUT;
            rc = -1;
        } else if (rc > 0) {
            int err = 0;
            socklen_t n = sizeof(err);
            rc = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) == 0 && err == 0 ? 0 : -1;
            if (rc < 0 && err) {
                errno = err;
            }
        }
    }
    const int saved = errno;
    fcntl(fd, F_SETFL, flags);
    errno = saved;
    if (rc < 0) {
        return -1;
    }
#endif
    return selfext_rpc_set_timeouts(fd, timeout) ? 0 : -1;
}

static std::mutex            g_error_mutex;
static std::string           g_last_error;
static std::atomic<uint64_t> g_error_count { 0 };

void selfext_rpc_fail(const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    {
        std::lock_guard<std::mutex> lock(g_error_mutex);
        g_last_error = buf;
    }
    g_error_count++;
    GGML_LOG_ERROR("%s\n", buf);
}

void selfext_rpc_hello_failed(const std::string & endpoint, double elapsed_s) {
    const double timeout = selfext_rpc_connect_timeout();
    if (elapsed_s >= timeout * 0.99) {
        selfext_rpc_fail("RPC server %s did not answer the hello within %.0f s (SELFEXT_RPC_CONNECT_TIMEOUT): it "
                         "serves one client at a time, is another one connected?", endpoint.c_str(), timeout);
    } else {
        selfext_rpc_fail("RPC server %s closed the connection at the hello: is it an RPC server?", endpoint.c_str());
    }
}

std::string selfext_rpc_lost(const std::string & endpoint, double elapsed_s) {
    const double timeout = selfext_rpc_call_timeout();
    char buf[256];
    if (elapsed_s >= timeout * 0.99) {
        snprintf(buf, sizeof(buf), "RPC server %s sent nothing for %.0f s (SELFEXT_RPC_TIMEOUT): giving up on it",
                 endpoint.c_str(), timeout);
    } else {
        snprintf(buf, sizeof(buf), "lost the connection to RPC server %s (it stopped, or the network failed)",
                 endpoint.c_str());
    }
    return buf;
}

uint64_t ggml_backend_rpc_error_count(void) {
    return g_error_count.load();
}

const char * ggml_backend_rpc_last_error(void) {
    static thread_local std::string copy;
    std::lock_guard<std::mutex> lock(g_error_mutex);
    copy = g_last_error;
    return copy.c_str();
}
