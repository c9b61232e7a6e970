// Package spawn generates exec workloads for tests and benchmarks of the
// exec watchers and of the whole agent: it builds a tiny static program and
// runs it many times, as fast as possible or at a given rate, either in the
// calling process or from a child process so that the caller's own CPU
// accounting stays clean.
//
// To spawn from a child process, a test binary calls MaybeChild first thing
// in TestMain, and the test calls RunChild.
package spawn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// Config describes an exec workload.
type Config struct {
	// Path is the program to execute, without arguments.
	Path string `json:"path"`
	// Workers is how many execs run at once; zero means one per CPU.
	Workers int `json:"workers"`
	// Rate is the target number of execs per second over all workers;
	// zero means as fast as possible.
	Rate float64 `json:"rate"`
	// Duration bounds the run; Count bounds the number of execs. At least
	// one must be set; the run stops at whichever comes first.
	Duration time.Duration `json:"duration"`
	Count    int           `json:"count"`
}

// Result is what a run did.
type Result struct {
	Execs   int           `json:"execs"`
	Failed  int           `json:"failed"`
	Elapsed time.Duration `json:"elapsed"`
	// PIDs holds the process IDs when the run was small enough
	// (Count ≤ 10,000), for tests that match events to processes.
	PIDs []int `json:"pids,omitempty"`
}

// PerSecond is the exec rate the run achieved.
func (r Result) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Execs) / r.Elapsed.Seconds()
}

const childEnv = "CLOUDPROTECT_SPAWN_CHILD"

// maxPIDs bounds Result.PIDs.
const maxPIDs = 10000

// Run executes the workload in this process and waits for every child.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if cfg.Path == "" {
		return Result{}, errors.New("run workload: no program")
	}
	if cfg.Duration <= 0 && cfg.Count <= 0 {
		return Result{}, errors.New("run workload: neither duration nor count set")
	}
	workers := cfg.Workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	if cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Duration)
		defer cancel()
	}
	var (
		mu     sync.Mutex // guards res and started
		res    Result
		start  = time.Now()
		wg     sync.WaitGroup
		issued int
	)
	keepPIDs := cfg.Count > 0 && cfg.Count <= maxPIDs
	// next hands out the slot for one more exec, or false when done.
	next := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if cfg.Count > 0 && issued >= cfg.Count {
			return 0, false
		}
		issued++
		return issued - 1, true
	}
	attr := &syscall.ProcAttr{Files: []uintptr{0, 1, 2}}
	argv := []string{filepath.Base(cfg.Path)}
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i, ok := next()
				if !ok {
					return
				}
				if cfg.Rate > 0 {
					due := start.Add(time.Duration(float64(i) / cfg.Rate * float64(time.Second)))
					if d := time.Until(due); d > 0 {
						select {
						case <-time.After(d):
						case <-ctx.Done():
							return
						}
					}
				}
				pid, err := syscall.ForkExec(cfg.Path, argv, attr)
				if err == nil {
					var ws syscall.WaitStatus
					for {
						_, err = syscall.Wait4(pid, &ws, 0, nil)
						if err != syscall.EINTR {
							break
						}
					}
				}
				mu.Lock()
				if err != nil {
					res.Failed++
				} else {
					res.Execs++
					if keepPIDs {
						res.PIDs = append(res.PIDs, pid)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	return res, nil
}

// MaybeChild turns the process into a spawner when it was started by
// RunChild: it runs the workload, prints the result and exits. Otherwise it
// returns at once. Call it first thing in TestMain.
func MaybeChild() {
	raw := os.Getenv(childEnv)
	if raw == "" {
		return
	}
	var cfg Config
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "spawn: decode config: %v\n", err)
		os.Exit(2)
	}
	res, err := Run(context.Background(), cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "spawn: %v\n", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// RunChild runs the workload from a child process (this executable,
// re-executed; it must call MaybeChild in TestMain) and returns its result,
// so the execs cost the caller no CPU time. It also returns the child's
// resource usage.
func RunChild(ctx context.Context, cfg Config) (Result, *syscall.Rusage, error) {
	self, err := os.Executable()
	if err != nil {
		return Result{}, nil, fmt.Errorf("find executable: %w", err)
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		return Result{}, nil, fmt.Errorf("encode config: %w", err)
	}
	cmd := exec.CommandContext(ctx, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	outb, err := cmd.Output()
	if err != nil {
		return Result{}, nil, fmt.Errorf("run spawner: %w", err)
	}
	var res Result
	if err := json.Unmarshal(outb, &res); err != nil {
		return Result{}, nil, fmt.Errorf("decode spawner result: %w", err)
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return res, ru, nil
}

// tinySource is a program that exits at once, with no libc and no dynamic
// loader, so that one exec is exactly one executed file.
const tinySource = `
static const char marker[] __attribute__((used)) = "%s";
void _start(void) {
#if defined(__x86_64__)
	__asm__ volatile("mov $60, %%eax\n\txor %%edi, %%edi\n\tsyscall");
#elif defined(__aarch64__)
	__asm__ volatile("mov x8, #93\n\tmov x0, #0\n\tsvc #0");
#else
#error "unsupported architecture"
#endif
	for (;;) {}
}
`

// sleeperSource is the tiny program that sleeps for a second before it
// exits: it lives long enough to be looked at through /proc.
const sleeperSource = `
static const char marker[] __attribute__((used)) = "%s";
static const long ts[2] = {1, 0};
void _start(void) {
#if defined(__x86_64__)
	__asm__ volatile("mov $35, %%%%eax\n\tmov %%0, %%%%rdi\n\txor %%%%esi, %%%%esi\n\tsyscall" :: "r"(ts) : "rax", "rdi", "rsi", "rcx", "r11", "memory");
	__asm__ volatile("mov $60, %%eax\n\txor %%edi, %%edi\n\tsyscall");
#elif defined(__aarch64__)
	register const long *x0 __asm__("x0") = ts;
	__asm__ volatile("mov x1, #0\n\tmov x8, #101\n\tsvc #0" : "+r"(x0) :: "x1", "x8", "memory");
	__asm__ volatile("mov x8, #93\n\tmov x0, #0\n\tsvc #0");
#else
#error "unsupported architecture"
#endif
	for (;;) {}
}
`

// BuildSleeper is BuildTiny for a program that sleeps for a second.
func BuildSleeper(ctx context.Context, dir, name, marker string) (string, error) {
	return build(ctx, dir, name, sleeperSource, marker)
}

// BuildTiny compiles the tiny static program into dir with a C compiler
// ($CC or cc) and returns its path. The marker is embedded so that programs
// built with different markers differ in content.
func BuildTiny(ctx context.Context, dir, name, marker string) (string, error) {
	return build(ctx, dir, name, tinySource, marker)
}

func build(ctx context.Context, dir, name, source, marker string) (string, error) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "cc"
	}
	if _, err := exec.LookPath(cc); err != nil {
		return "", fmt.Errorf("find C compiler: %w", err)
	}
	src := filepath.Join(dir, name+".c")
	if err := os.WriteFile(src, fmt.Appendf(nil, source, marker), 0o644); err != nil {
		return "", fmt.Errorf("write program source: %w", err)
	}
	out := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, cc, "-static", "-nostdlib", "-O2", "-o", out, src)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("compile tiny program: %w: %s", err, msg)
	}
	os.Remove(src)
	return out, nil
}
