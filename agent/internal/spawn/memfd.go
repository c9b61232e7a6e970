package spawn

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNoMemfd is returned by FromMemory when the kernel refuses
// memfd_create.
var ErrNoMemfd = fmt.Errorf("memfd_create refused")

// FromMemory runs the program at path from a memory file descriptor
// (memfd_create, then execve of /proc/self/fd/N), as fileless malware
// does, waits for it and returns its process ID. No filesystem a watcher
// can mark holds the file that runs.
func FromMemory(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	fd, err := unix.MemfdCreate("cloudprotect-test", unix.MFD_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNoMemfd, err)
	}
	defer unix.Close(fd)
	if _, err := unix.Write(fd, b); err != nil {
		return 0, fmt.Errorf("write the program to memory: %w", err)
	}
	pid, err := syscall.ForkExec("/proc/self/fd/3", []string{"memfd-program"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2, uintptr(fd)}})
	if err != nil {
		return 0, fmt.Errorf("exec from memory: %w", err)
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
		return pid, fmt.Errorf("program run from memory: %v, status %v", err, ws)
	}
	return pid, nil
}
