import subprocess, os
def test_scratch(sdk_sandbox):
    sb = sdk_sandbox()
    p = subprocess.Popen(["sleep", "300"])
    sb.files.write("/tmp/probe.py", open("/tmp/esc/probe.py").read())
    r = sb.commands.run(["python3", "/tmp/probe.py", str(p.pid)])
    print(r)
    p.kill(); p.wait()
    assert 1
