package identify

import (
	"github.com/cloudprotect/cloudprotect/wire"

	"strings"
	"testing"
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
	users, err := parsePasswd(strings.NewReader(testPasswd))
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
	users, err := parsePasswd(strings.NewReader(testPasswd))
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
		{"home elsewhere prefix only", "/data/users/bobby/tool", "/data/users/bobby/tool"},
		{"var home", "/var/home/erin/x", "~/x"},
		{"run user", "/run/user/1000/app/x", "/run/user/~/app/x"},
		{"run user itself", "/run/user/1000", "/run/user/~"},
		{"media", "/media/alice/USB/run.sh", "/media/~/USB/run.sh"},
		{"run media", "/run/media/zed/USB/x", "/run/media/~/USB/x"},
		{"name component", "/srv/backups/alice/x", "/srv/backups/~/x"},
		{"name in tmp", "/tmp/bob/a.out", "/tmp/~/a.out"},
		{"name as part of component stays", "/tmp/alice-build/x", "/tmp/alice-build/x"},
		{"system user home ignored", "/usr/sbin/cron", "/usr/sbin/cron"},
		{"slash home ignored", "/bin/ls", "/bin/ls"},
		{"service home", "/var/lib/postgresql/x", "/var/lib/postgresql/x"},
		{"unclean path", "/home//alice/../alice/./x", "~/x"},
		{"dot dot escape from tmp", "/tmp/../home/alice/x", "~/x"},
		{"deleted suffix", "/home/alice/x (deleted)", "~/x (deleted)"},
		{"relative", "alice/x", "~/x"},
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

func TestAnonymizeNoUserNames(t *testing.T) {
	t.Parallel()
	users := []User{{"alice", "/home/alice"}, {"bob", "/data/users/bob"}, {"carol", "/srv/carol-home"}}
	a := NewAnonymizer(users)
	prefixes := []string{"/home/%s", "/data/users/%s", "/srv/%s-home", "/media/%s", "/run/media/%s", "/tmp/%s", "/opt/%s/bin", "%s"}
	for _, u := range users {
		for _, p := range prefixes {
			in := strings.ReplaceAll(p, "%s", u.Name) + "/x"
			got := a.Anonymize(in)
			for _, v := range users {
				for _, c := range strings.Split(got, "/") {
					if c == v.Name || strings.Contains(got, v.Home+"/") {
						t.Errorf("Anonymize(%q) = %q still holds %q", in, got, v.Name)
					}
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
