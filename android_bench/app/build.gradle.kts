plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchVersion = "1.0.1"

android {
    namespace = "org.mobilevmoe.bench"
    compileSdk = 34

    defaultConfig {
        applicationId = "org.mobilevmoe.bench"
        minSdk = 29 // PowerManager.getCurrentThermalStatus
        targetSdk = 34
        versionCode = 1
        versionName = "1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") } // the ABIs executorch-android ships
        buildConfigField("String", "EXECUTORCH_VERSION", "\"$executorchVersion\"")
    }
    buildFeatures { buildConfig = true }

    buildTypes {
        // The driver installs the debug build so that `run-as` can read the result; inference runs in the
        // AAR's prebuilt release native code either way.
        debug { isJniDebuggable = false }
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation("org.pytorch:executorch-android:$executorchVersion")
    // Native loader and JNI helpers the AAR uses (declared explicitly, as ExecuTorch's docs do).
    implementation("com.facebook.soloader:soloader:0.10.5")
    implementation("com.facebook.fbjni:fbjni:0.5.1")
}
