package identify

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cloudprotect/cloudprotect/agent/testenv"
	"github.com/cloudprotect/cloudprotect/wire"
)

func TestPackageManaged(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		path string
		want bool
	}{
		{"usr bin", "/usr/bin/ls", true},
		{"usr lib", "/usr/lib/x86_64-linux-gnu/libc.so.6", true},
		{"usr libexec", "/usr/libexec/git-core/git", true},
		{"bin", "/bin/sh", true},
		{"sbin", "/sbin/init", true},
		{"lib64", "/lib64/ld-linux-x86-64.so.2", true},
		{"lib32", "/lib32/libc.so.6", true},
		{"usr local", "/usr/local/bin/tool", false},
		{"usr tmp", "/usr/tmp/x", false},
		{"usr itself", "/usr", false},
		{"home", "/home/alice/bin/tool", false},
		{"root", "/root/a.out", false},
		{"tmp", "/tmp/x", false},
		{"var tmp", "/var/tmp/x", false},
		{"opt", "/opt/app/bin/app", false},
		{"snap", "/snap/bin/app", false},
		{"dot dot escape", "/usr/bin/../../tmp/x", false},
		{"dot dot into usr local", "/usr/bin/../local/bin/x", false},
		{"relative", "usr/bin/ls", false},
		{"libfoo lookalike is a lib dir", "/libfoo/x", true},
		{"empty", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := PackageManaged(tc.path); got != tc.want {
				t.Errorf("PackageManaged(%q) = %v, want %v", tc.path, got, tc.want)
			}
		})
	}
}

const testPasswd = `root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
postgres:x:110:117:PostgreSQL:/var/lib/postgresql:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
bob:x:1001:1001::/data/users/bob:/bin/bash
carol:x:1002:1002::/:/bin/sh
# a comment
broken line
dave:x:notanumber:1003::/home/dave:/bin/sh
`

func TestParsePasswd(t *testing.T) {
	t.Parallel()
	users, err := parsePasswd(strings.NewReader(testPasswd), defaultUIDMin)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, u := range users {
		names = append(names, u.Name+"="+u.Home)
	}
	got := strings.Join(names, " ")
	want := "root=/root alice=/home/alice bob=/data/users/bob carol=/"
	if got != want {
		t.Errorf("parsePasswd = %q, want %q", got, want)
	}
}

func TestAnonymize(t *testing.T) {
	t.Parallel()
	users, err := parsePasswd(strings.NewReader(testPasswd), defaultUIDMin)
	if err != nil {
		t.Fatal(err)
	}
	a := NewAnonymizer(users)
	tests := []struct {
		name string
		path string
		want string
	}{
		{"home", "/home/alice/bin/tool", "~/bin/tool"},
		{"home of unknown user", "/home/zed/x", "~/x"},
		{"home dir itself", "/home/alice", "~"},
		{"home parent", "/home", "~"},
		{"home in a container's root", "/var/lib/machines/deb/home/alice/bin/x", "/var/lib/machines/deb/~/bin/x"},
		{"root in a container's root", "/var/lib/lxc/c1/rootfs/root/a.out", "/var/lib/lxc/c1/rootfs/~/a.out"},
		{"home twice", "/srv/home/zed/mnt/home/yan/x", "/srv/~/mnt/~/x"},
		{"a folder named home at the end", "/srv/data/home", "/srv/data/home"},
		{"root", "/root/a.out", "~/a.out"},
		{"root itself", "/root", "~"},
		{"rootfoo is not root", "/rootfs/x", "/rootfs/x"},
		{"home elsewhere", "/data/users/bob/tool", "~/tool"},
		{"home elsewhere prefix only, name inside", "/data/users/bobby/tool", "/data/users/~by/tool"},
		{"var home", "/var/home/erin/x", "~/x"},
		{"run user", "/run/user/1000/app/x", "/run/user/~/app/x"},
		{"run user itself", "/run/user/1000", "/run/user/~"},
		{"media", "/media/alice/USB/run.sh", "/media/~/USB/run.sh"},
		{"run media", "/run/media/zed/USB/x", "/run/media/~/USB/x"},
		{"name component", "/srv/backups/alice/x", "/srv/backups/~/x"},
		{"name in tmp", "/tmp/bob/a.out", "/tmp/~/a.out"},
		{"name inside a component", "/tmp/alice-build/x", "/tmp/~-build/x"},
		{"name inside a component, other case", "/home/alice/secret-project/ALICE-payroll-export", "~/secret-project/~-payroll-export"},
		{"name twice in a component", "/tmp/bobbob/x", "/tmp/~/x"},
		{"name at the end", "/opt/tools/run-as-carol", "/opt/tools/run-as-~"},
		{"system user home ignored", "/usr/sbin/cron", "/usr/sbin/cron"},
		{"slash home ignored", "/bin/ls", "/bin/ls"},
		{"service home", "/var/lib/postgresql/x", "/var/lib/postgresql/x"},
		{"unclean path", "/home//alice/../alice/./x", "~/x"},
		{"dot dot escape from tmp", "/tmp/../home/alice/x", "~/x"},
		{"deleted suffix", "/home/alice/x (deleted)", "~/x (deleted)"},
		{"relative", "alice/x", "~/x"},
		{"system account's name stays", "/usr/lib/postgresql/15/bin/postgres", "/usr/lib/postgresql/15/bin/postgres"},
		{"empty", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := a.Anonymize(tc.path); got != tc.want {
				t.Errorf("Anonymize(%q) = %q, want %q", tc.path, got, tc.want)
			}
		})
	}
}

// TestAnonymizeNoUserNames checks that no known user name survives in any
// path built from names and homes.
// Whatever the path, the cloud accepts what the anonymiser makes of it: a
// refused path would cost the whole batch it travels in.
func TestAnonymizedPathsPassTheCloudsCheck(t *testing.T) {
	t.Parallel()
	a := NewAnonymizer([]User{{"alice", "/home/alice"}})
	for _, p := range []string{
		"/home", "/root", "/home/alice", "/root/x", "/x/home/y/z", "/x/root/y", "/a/home/b/home/c/d",
		"/home/alice/root/home/x", "/srv/root/", "/tmp/home/", "//home//alice//x", "/var/lib/machines/deb/home/alice/.local/bin/tool",
		"/tmp/a\x01b", "/tmp/\xff\xfe", "/tmp/" + strings.Repeat("long/", 1000) + "x",
	} {
		if why := wire.CheckPath(a.Anonymize(p)); why != "" {
			t.Errorf("Anonymize(%q) = %q, which the cloud refuses: %s", p, a.Anonymize(p), why)
		}
	}
}

// The computer's names go like user names; a name shorter than three
// characters only where it stands as a word.
func TestAnonymizeHostNames(t *testing.T) {
	t.Parallel()
	a := NewAnonymizerFor(Names{Users: []User{{"al", "/home/al"}}, Hosts: []string{"vm", "build7.corp.example.org", "build7"}})
	for _, tc := range []struct{ in, want string }{
		{"/tmp/vm-nightly/sync", "/tmp/~-nightly/sync"},
		{"/tmp/VM/sync", "/tmp/~/sync"},
		{"/usr/bin/vmstat", "/usr/bin/vmstat"},
		{"/opt/build7-agent/bin/run", "/opt/~-agent/bin/run"},
		{"/srv/build7.corp.example.org/ci/x", "/srv/~/ci/x"},
		{"/srv/Build7.Corp.Example.Org-cache/x", "/srv/~-cache/x"},
		{"/tmp/al-build/x", "/tmp/~-build/x"},
		{"/usr/bin/install", "/usr/bin/install"},
		{"/tmp/x.al", "/tmp/x.~"},
	} {
		if got := a.Anonymize(tc.in); got != tc.want {
			t.Errorf("Anonymize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// A system anonymizer keeps up: an account added after it started, with
// its home outside /home, is known once /etc/passwd changes; the
// computer's names come from the kernel, /etc/hostname, /etc/hosts and
// /etc/machine-info.
func TestSystemAnonymizerSources(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(root, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("etc/passwd", testPasswd)
	write("etc/hostname", "Nightly-Box\n")
	write("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 nightly-box.lab.example.net nightly-box # this computer\n10.0.0.2 other\n")
	write("etc/machine-info", "PRETTY_HOSTNAME=\"Zed's Laptop\"\n")
	os.MkdirAll(filepath.Join(root, "proc"), 0o755)
	a := &Anonymizer{src: &sources{root: root, uidMin: defaultUIDMin, learned: map[uint32]User{}, looked: map[uint32]bool{}}}
	a.Refresh()
	for _, tc := range []struct{ in, want string }{
		{"/srv/nightly-box/x", "/srv/~/x"},
		{"/srv/NIGHTLY-BOX.lab.example.net-cache/x", "/srv/~-cache/x"},
		{"/srv/zed's laptop/x", "/srv/~/x"},
		{"/srv/other/x", "/srv/other/x"},
		{"/u/dora/bin/tool", "/u/dora/bin/tool"},
	} {
		if got := a.Anonymize(tc.in); got != tc.want {
			t.Errorf("Anonymize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	// dora arrives with a home outside /home.
	write("etc/passwd", testPasswd+"dora:x:1010:1010::/u/dora:/bin/sh\n")
	a.Refresh()
	for _, tc := range []struct{ in, want string }{
		{"/u/dora/bin/tool", "~/bin/tool"},
		{"/tmp/Dora-build/parser", "/tmp/~-build/parser"},
	} {
		if got := a.Anonymize(tc.in); got != tc.want {
			t.Errorf("after the account was added: Anonymize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// Anonymizing twice changes nothing.
func TestAnonymizeIdempotent(t *testing.T) {
	t.Parallel()
	a := NewAnonymizerFor(Names{Users: []User{{"alice", "/home/alice"}, {"bo", "/srv/bo"}}, Hosts: []string{"vm", "alicebox"}})
	for _, p := range []string{"/tmp/alice-bo-vm/x", "/srv/bo/vm", "/home/alice/alicebox/x", "/tmp/xbo-bo/y", "/media/alice/alice"} {
		once := a.Anonymize(p)
		if twice := a.Anonymize(once); twice != once {
			t.Errorf("Anonymize(%q) = %q, then %q", p, once, twice)
		}
	}
}

func TestAnonymizeNoUserNames(t *testing.T) {
	t.Parallel()
	users := []User{{"alice", "/home/alice"}, {"bob", "/data/users/bob"}, {"carol", "/srv/carol-home"}}
	a := NewAnonymizer(users)
	prefixes := []string{"/home/%s", "/data/users/%s", "/srv/%s-home", "/media/%s", "/run/media/%s", "/tmp/%s", "/opt/%s/bin", "%s",
		"/tmp/%s-build", "/tmp/x%sx", "/srv/%s%s"}
	for _, u := range users {
		for _, p := range prefixes {
			in := strings.ReplaceAll(p, "%s", strings.ToUpper(u.Name[:1])+u.Name[1:]) + "/x"
			got := a.Anonymize(in)
			for _, v := range users {
				if strings.Contains(strings.ToLower(got), v.Name) || strings.Contains(got, v.Home+"/") {
					t.Errorf("Anonymize(%q) = %q still holds %q", in, got, v.Name)
				}
			}
		}
	}
}

func TestScriptInterpreter(t *testing.T) {
	t.Parallel()
	a := NewAnonymizer([]User{{"alice", "/home/alice"}})
	tests := []struct {
		name string
		head string
		want string
	}{
		{"sh", "#!/bin/sh\necho hi\n", "/bin/sh"},
		{"space and args", "#! /usr/bin/python3 -u\n", "/usr/bin/python3"},
		{"env", "#!/usr/bin/env python3\n", "/usr/bin/env python3"},
		{"env with flag", "#!/usr/bin/env -S python3 -u\n", "/usr/bin/env"},
		{"env with path arg", "#!/usr/bin/env /home/alice/py\n", "/usr/bin/env"},
		{"home interpreter", "#!/home/alice/venv/bin/python\n", "~/venv/bin/python"},
		{"crlf", "#!/bin/bash\r\n", "/bin/bash"},
		{"control chars", "#!/bin/\x1bsh\n", "/bin/?sh"},
		{"empty line", "#!\n", ""},
		{"no newline", "#!/bin/sh", "/bin/sh"},
		{"not a script", "echo\n", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := ScriptInterpreter([]byte(tc.head), a); got != tc.want {
				t.Errorf("ScriptInterpreter(%q) = %q, want %q", tc.head, got, tc.want)
			}
		})
	}
}

// A person whose processes run is known even when the account database
// the anonymizer reads does not list them (a directory service's
// account): their name and home (outside /home) are learnt from the
// running process's owner.
func TestSystemAnonymizerLearnsRunningPeople(t *testing.T) {
	testenv.NeedRoot(t)
	home := filepath.Join("/u", fmt.Sprintf("cpdir%d", os.Getpid()))
	t.Cleanup(func() { os.Remove("/u") }) // after the account's home, if nothing else is in it
	acct := testenv.AddUser(t, "cpdir", home)
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte(testPasswd), 0o644)
	if err := os.Symlink("/proc", filepath.Join(root, "proc")); err != nil {
		t.Fatal(err)
	}
	a := &Anonymizer{src: &sources{root: root, uidMin: defaultUIDMin, learned: map[uint32]User{}, looked: map[uint32]bool{}}}
	a.Refresh()
	in := filepath.Join(acct.Home, "bin", "tool")
	if got := a.Anonymize(in); got != in {
		t.Fatalf("before any process of the account ran: Anonymize(%q) = %q", in, got)
	}
	cmd := exec.Command("/bin/sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: acct.UID, Gid: acct.GID, Groups: []uint32{}}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	a.Refresh()
	for _, tc := range []struct{ in, want string }{
		{in, "~/bin/tool"},
		{"/tmp/" + strings.ToUpper(acct.Name) + "-build/parser", "/tmp/~-build/parser"},
	} {
		if got := a.Anonymize(tc.in); got != tc.want {
			t.Errorf("while the account runs a program: Anonymize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
