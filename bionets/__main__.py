from bionets.cli import main

raise SystemExit(main())
