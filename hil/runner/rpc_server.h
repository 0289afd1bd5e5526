// kiln-runner's TVM RPC server mode: MetaSchedule measures candidate kernels on the board.
//
//   kiln-runner --rpc-serve PORT --rpc-key KEY [--rpc-host 127.0.0.1] [--threads N]
//
// libtvm_runtime has the RPC protocol itself ("rpc.ServerLoop" on a connected socket), but not
// the server around it (TVM's own one is Python, or apps/cpp_rpc, which needs headers the wheel
// lacks). This is that server, in POSIX sockets:
//  - listen on HOST:PORT (PORT 0: a free one) and print "kiln-runner rpc listening on HOST:PORT";
//  - per connection, TVM's handshake: int32 magic 0xff271, int32 length, key
//    "client:<key>[ -timeout=N]". A key equal to KEY, or KEY:<anything> (the match keys an RPC
//    tracker hands out), is answered kRPCSuccess + "server:KEY"; any other kRPCMismatch;
//  - fork per session: the child gets a scratch directory, registers tvm.rpc.server.workpath and
//    tvm.rpc.server.load_module (which libtvm_runtime leaves to the host program) and runs
//    rpc.ServerLoop. A candidate that crashes (SIGSEGV, SIGILL) takes only its child down;
//  - the parent kills a session still running past its -timeout (MetaSchedule's RPC runner has
//    no timeout of its own: the server's is the only one), reaps children and removes their
//    scratch directories. The parent does no TVM work, so no thread pool exists when it forks.
// SIGTERM/SIGINT stop the server and every session.

#pragma once

#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <arpa/inet.h>
#include <ftw.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

namespace kiln {

namespace rpc_detail {

namespace ffi = tvm::ffi;

// TVM's handshake codes (src/runtime/rpc/rpc_endpoint.h, restated: the wheel lacks that header).
constexpr int32_t kRPCMagic = 0xff271;
constexpr int32_t kRPCMismatch = kRPCMagic + 2;
constexpr int kHandshakeTimeoutS = 5;  // a client that connects and says nothing is dropped
constexpr int kExitError = 2;
constexpr int kAffinityBig = 1;  // ThreadGroup::AffinityMode::kBig, as in runner.cc

struct RpcError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct RpcOptions {
  int port = -1;
  std::string key;
  std::string host = "127.0.0.1";
  int64_t threads = 0;
};

struct Session {
  std::string dir;
  std::chrono::steady_clock::time_point deadline;
  bool has_deadline = false;
  bool killed = false;
};

volatile sig_atomic_t g_stop = 0;
void OnStop(int) { g_stop = 1; }

int64_t ParseCount(const std::string& flag, const std::string& text, int64_t lo, int64_t hi) {
  bool ok = !text.empty() && text.size() <= 9;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  if (!ok || std::stoll(text) < lo || std::stoll(text) > hi) {
    throw RpcError(flag + ": expected an integer from " + std::to_string(lo) + " to " + std::to_string(hi) +
                   ", got '" + text + "'");
  }
  return std::stoll(text);
}

RpcOptions ParseRpcArgs(int argc, char** argv) {
  RpcOptions opt;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw RpcError(flag + ": missing value");
    std::string value = argv[++i];
    if (flag == "--rpc-serve") {
      opt.port = static_cast<int>(ParseCount(flag, value, 0, 65535));
    } else if (flag == "--rpc-key") {
      if (value.empty() || value.find_first_of(" \t\n") != std::string::npos) {
        throw RpcError("--rpc-key: expected a non-empty key without spaces, got '" + value + "'");
      }
      opt.key = value;
    } else if (flag == "--rpc-host") {
      opt.host = value;
    } else if (flag == "--threads") {
      opt.threads = ParseCount(flag, value, 1, 4096);
    } else {
      throw RpcError("unknown argument '" + flag +
                     "' in --rpc-serve mode (expected --rpc-serve PORT --rpc-key KEY [--rpc-host ADDR] "
                     "[--threads N])");
    }
  }
  if (opt.key.empty()) throw RpcError("--rpc-key: required with --rpc-serve");
  return opt;
}

// Reads exactly n bytes; false on EOF, error or the socket's receive timeout.
bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// The server side of TVM's handshake. Returns true when the session may start; *timeout_s is the
// client's -timeout (0: none). A refused or broken handshake closes nothing: the caller does.
bool Handshake(int fd, const std::string& key, int64_t* timeout_s, std::string* why) {
  timeval tv{kHandshakeTimeoutS, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  int32_t magic = 0, len = 0;
  if (!RecvAll(fd, &magic, sizeof(magic)) || magic != kRPCMagic) {
    *why = "not a TVM RPC client (bad magic)";
    return false;
  }
  if (!RecvAll(fd, &len, sizeof(len)) || len < 0 || len > 4096) {
    *why = "bad key length";
    return false;
  }
  std::string client(static_cast<size_t>(len), '\0');
  if (len > 0 && !RecvAll(fd, &client[0], static_cast<size_t>(len))) {
    *why = "connection closed during the handshake";
    return false;
  }
  // "client:<key>[ -timeout=N]"
  std::string first = client.substr(0, client.find(' '));
  const std::string prefix = "client:";
  std::string asked = first.rfind(prefix, 0) == 0 ? first.substr(prefix.size()) : std::string();
  bool match = first.rfind(prefix, 0) == 0 && (asked == key || asked.rfind(key + ":", 0) == 0);
  if (!match) {
    *why = "key '" + client + "' does not match server key '" + key + "'";
    int32_t code = kRPCMismatch;
    SendAll(fd, &code, sizeof(code));
    return false;
  }
  *timeout_s = 0;
  size_t at = client.find(" -timeout=");
  if (at != std::string::npos) *timeout_s = std::atoll(client.c_str() + at + 10);
  std::string reply = "server:" + key;
  int32_t code = kRPCMagic, rlen = static_cast<int32_t>(reply.size());
  if (!SendAll(fd, &code, sizeof(code)) || !SendAll(fd, &rlen, sizeof(rlen)) ||
      !SendAll(fd, reply.data(), reply.size())) {
    *why = "connection closed during the handshake";
    return false;
  }
  timeval none{0, 0};  // the session itself waits on the client as long as it likes
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
  return true;
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return remove(path); }

void RemoveTree(const std::string& dir) { nftw(dir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }

const char* SignalName(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGILL: return "SIGILL: the candidate uses an instruction this CPU lacks";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGABRT: return "SIGABRT";
    default: return "a signal";
  }
}

// The child: serve one session in its scratch directory, then exit (never returns).
[[noreturn]] void ServeSession(int fd, const std::string& dir, int64_t threads) {
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  int code = 0;
  try {
    if (chdir(dir.c_str()) != 0) throw RpcError("cannot enter scratch dir " + dir);
    if (threads > 0) {
      setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
      ffi::Function::GetGlobalRequired("runtime.config_threadpool")(kAffinityBig, static_cast<int>(threads));
    }
    auto resolve = [dir](const std::string& p) { return !p.empty() && p[0] == '/' ? p : dir + "/" + p; };
    ffi::Function::SetGlobal("tvm.rpc.server.workpath",
                             ffi::Function::FromTyped([resolve](std::string p) { return resolve(p); }), true);
    ffi::Function::SetGlobal(
        "tvm.rpc.server.load_module",
        ffi::Function::FromTyped([resolve](std::string p) { return ffi::Module::LoadFromFile(resolve(p)); }),
        true);
    ffi::Function::GetGlobalRequired("rpc.ServerLoop")(static_cast<int64_t>(fd));
  } catch (const ffi::Error& e) {
    std::cerr << "kiln-runner rpc: session " << getpid() << ": TVM " << e.kind() << ": " << e.message()
              << std::endl;
    code = kExitError;
  } catch (const std::exception& e) {
    std::cerr << "kiln-runner rpc: session " << getpid() << ": " << e.what() << std::endl;
    code = kExitError;
  }
  close(fd);
  _exit(code);
}

void Reap(std::map<pid_t, Session>* sessions) {
  int status = 0;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    auto it = sessions->find(pid);
    if (it == sessions->end()) continue;
    if (WIFSIGNALED(status) && !it->second.killed) {
      std::cerr << "kiln-runner rpc: session " << pid << " died of signal " << WTERMSIG(status) << " ("
                << SignalName(WTERMSIG(status)) << "); the server goes on" << std::endl;
    }
    RemoveTree(it->second.dir);
    sessions->erase(it);
  }
}

void KillOverdue(std::map<pid_t, Session>* sessions) {
  auto now = std::chrono::steady_clock::now();
  for (auto& [pid, s] : *sessions) {
    if (s.has_deadline && !s.killed && now >= s.deadline) {
      std::cerr << "kiln-runner rpc: session " << pid << " ran past its -timeout: killed" << std::endl;
      kill(pid, SIGKILL);
      s.killed = true;
    }
  }
}

int Listen(const RpcOptions& opt, int* port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw RpcError(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(opt.port));
  if (inet_pton(AF_INET, opt.host.c_str(), &addr.sin_addr) != 1) {
    throw RpcError("--rpc-host: expected an IPv4 address such as 127.0.0.1, got '" + opt.host + "'");
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw RpcError("--rpc-serve: cannot listen on " + opt.host + ":" + std::to_string(opt.port) + ": " +
                   std::strerror(errno));
  }
  if (listen(fd, 16) != 0) throw RpcError(std::string("listen: ") + std::strerror(errno));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

int Serve(const RpcOptions& opt) {
  struct sigaction sa {};
  sa.sa_handler = OnStop;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  int port = 0;
  int lfd = Listen(opt, &port);
  char cwd[4096];
  if (getcwd(cwd, sizeof(cwd)) == nullptr) throw RpcError("cannot read the working directory");
  std::printf("kiln-runner rpc listening on %s:%d\n", opt.host.c_str(), port);
  std::fflush(stdout);
  std::map<pid_t, Session> sessions;
  while (!g_stop) {
    Reap(&sessions);
    KillOverdue(&sessions);
    pollfd p{lfd, POLLIN, 0};
    int n = poll(&p, 1, 100);
    if (n <= 0) continue;  // a timeout, or EINTR (SIGCHLD, SIGTERM)
    int fd = accept(lfd, nullptr, nullptr);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int64_t timeout_s = 0;
    std::string why;
    if (!Handshake(fd, opt.key, &timeout_s, &why)) {
      std::cerr << "kiln-runner rpc: connection refused: " << why << std::endl;
      close(fd);
      continue;
    }
    std::string dir = std::string(cwd) + "/rpc-session-XXXXXX";
    if (mkdtemp(&dir[0]) == nullptr) {
      std::cerr << "kiln-runner rpc: cannot make a scratch dir in " << cwd << ": " << std::strerror(errno)
                << std::endl;
      close(fd);
      continue;
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(lfd);
      ServeSession(fd, dir, opt.threads);
    }
    close(fd);
    if (pid < 0) {
      std::cerr << "kiln-runner rpc: fork: " << std::strerror(errno) << std::endl;
      RemoveTree(dir);
      continue;
    }
    Session s;
    s.dir = dir;
    if (timeout_s > 0) {
      s.has_deadline = true;
      s.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    }
    sessions[pid] = s;
    std::cerr << "kiln-runner rpc: session " << pid << " started";
    if (timeout_s > 0) std::cerr << " (-timeout=" << timeout_s << ")";
    std::cerr << std::endl;
  }
  close(lfd);
  for (auto& [pid, s] : sessions) kill(pid, SIGKILL);
  for (auto& [pid, s] : sessions) {
    waitpid(pid, nullptr, 0);
    RemoveTree(s.dir);
  }
  return 0;
}

}  // namespace rpc_detail

inline int RpcServeMain(int argc, char** argv) {
  try {
    return rpc_detail::Serve(rpc_detail::ParseRpcArgs(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "kiln-runner: error: " << e.what() << std::endl;
    return rpc_detail::kExitError;
  }
}

}  // namespace kiln
